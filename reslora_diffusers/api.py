"""The public entry points: they find the model's family (:mod:`.frontends`) and let it act.

* diffusers pipelines -> :mod:`.frontends.pipelines` (the denoiser, plus text encoders on request)
* UNets, SD3/Flux transformers, CLIP/T5 text encoders, transformers models, anything else ->
  :func:`.frontends.frontend_for`
"""

from __future__ import annotations

from pathlib import Path

from .core import ResLoRAConfig, load_checkpoint
from .core.checkpoint import Models
from .frontends import add_reslora_to_pipeline, frontend_for, is_pipeline, remove_reslora_from_pipeline


def add_reslora(model, config: ResLoRAConfig, *, train_text_encoder: bool = False):
    """Apply ResLoRA to ``model`` in place and return it.

    ``model`` may be a diffusers pipeline (its UNet or transformer, plus the text encoders its
    LoRA loader loads when ``train_text_encoder``), a ``UNet2DConditionModel``, an
    ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``, a CLIP or T5 text encoder, a transformers
    model, or any ``nn.Module`` (then ``config.target_modules`` must name its layers).
    """
    if is_pipeline(model):
        return add_reslora_to_pipeline(model, config, train_text_encoder=train_text_encoder)
    return frontend_for(model).attach(model, config)


def remove_reslora(model):
    """Undo :func:`add_reslora`: the original modules are put back."""
    if is_pipeline(model):
        return remove_reslora_from_pipeline(model)
    return frontend_for(model).detach(model)


def load_reslora_checkpoint(models: Models, path: str | Path) -> Models:
    """Load a checkpoint into ``models`` (a model or ``{component: model}``), adding ResLoRA
    through the model's front end where it has none (see :func:`reslora_diffusers.core.load_checkpoint`)."""
    return load_checkpoint(models, path, attach=add_reslora)
