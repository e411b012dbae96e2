"""HF ``Trainer`` integration: write the ResLoRA checkpoint beside each Trainer checkpoint.

The Trainer saves the model with ``save_pretrained`` (ResLoRA's ``lora_A``/``lora_B`` and norm
windows are ordinary parameters and buffers, so ``resume_from_checkpoint`` restores them).
:class:`ResLoRACallback` adds the portable ResLoRA checkpoint (A, B, norm windows, config and
chain structure; see :func:`reslora_diffusers.save_reslora_checkpoint`) to every
``checkpoint-<step>`` directory and to ``output_dir`` at the end of training, so that any
checkpoint can be merged or exported later with ``load_reslora_checkpoint`` on a fresh base::

    add_reslora(model, ResLoRAConfig(res_type="bs"))
    trainer = Trainer(model, args, train_dataset=..., callbacks=[ResLoRACallback()])
    trainer.train()

``ResLoRACallback(shortcut_schedule="cosine")`` also sets the shortcut scale before every
step from ``state.global_step / state.max_steps`` (see
:func:`reslora_diffusers.core.schedule.shortcut_scale_at`): 1 until ``decay_start``, then
down to exactly 0 at the last step, so that the trained model exports exactly.

Gradient checkpointing (``TrainingArguments(gradient_checkpointing=True)``) works with
``res_type`` ``none`` and ``bs``; ``is`` and ``ms`` refuse it at the first training step.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..core import has_reslora, save_reslora_checkpoint, set_shortcut_scale
from ..core.schedule import check_schedule, shortcut_scale_at

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "reslora.safetensors"


class ResLoRACallback(TrainerCallback):
    """Saves ``<dir>/reslora.safetensors`` into each Trainer checkpoint and into ``output_dir``.

    Args:
        filename: name of the ResLoRA checkpoint file inside each directory.
        shortcut_schedule: ``constant`` (the scale is left alone), ``linear`` or ``cosine``.
        decay_start: fraction of ``max_steps`` where a decaying schedule starts (default 0.5).
    """

    def __init__(
        self,
        filename: str = CHECKPOINT_NAME,
        shortcut_schedule: str = "constant",
        decay_start: float | None = None,
    ) -> None:
        self.filename = filename
        self.shortcut_schedule = shortcut_schedule
        self.decay_start = check_schedule(shortcut_schedule, decay_start)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if self.shortcut_schedule != "constant":
            step = state.global_step + 1  # the step about to run, 1-based
            scale = shortcut_scale_at(step, state.max_steps, self.shortcut_schedule, self.decay_start)
            set_shortcut_scale(_unwrap(model), scale)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if state.is_world_process_zero:
            self._save(model, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if state.is_world_process_zero and args.should_save:
            self._save(model, Path(args.output_dir))

    def _save(self, model, directory: Path) -> None:
        path = save_reslora_checkpoint(_unwrap(model), directory / self.filename)
        logger.info("ResLoRA checkpoint written to %s", path)


def _unwrap(model):
    """The model ``add_reslora`` prepared (DDP and similar wrappers keep it as ``.module``)."""
    while hasattr(model, "module") and not has_reslora(model):
        model = model.module
    return model
