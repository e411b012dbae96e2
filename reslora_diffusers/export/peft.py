"""Export a trained ResLoRA model as a PEFT LoRA adapter directory.

The shortcuts are merged away by :func:`reslora_diffusers.merge_to_lora`, which returns per
module ``A'`` (r' x in) and ``B'`` (out x r') with the scaling already in ``B'``, so that
``dW = B' A'``. PEFT computes ``dW = (lora_alpha / r) B A``; the export therefore sets
``lora_alpha = r`` for every module (scale exactly 1). Ranks differ per module for
``bs`` (``(k+1) r`` with ``k`` predecessors) and after ``rank=`` truncation; the modules whose
rank differs from the most common one get their own entry in PEFT's ``rank_pattern`` and
``alpha_pattern`` (keys are the escaped full module paths, longest first, so each matches
exactly one module). Layers whose weight is stored ``(in, out)`` (the layer's ``fan_in_fan_out``,
GPT-2's ``Conv1D``) are written with ``fan_in_fan_out=True``; ``Conv2d`` layers as PEFT's
convolution LoRA (``A`` ``(r, in, kh, kw)``, ``B`` ``(out, r, 1, 1)``).

Files written atomically to ``output_dir``:

* ``adapter_model.safetensors``: ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``,
  plus the full weights of ``modules_to_save`` (e.g. a trained classification head);
* ``adapter_config.json``: a ``peft.LoraConfig``;
* ``merge_report.json``: the :class:`~reslora_diffusers.core.MergeReport` (method, merge
  scalars, truncation errors, ranks, and the relative output error on ``eval_inputs``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch.nn as nn

from ..core import ResLoRALayer, get_state
from ..merge import DEFAULT_DISTILL_STEPS, Batch, MergedLoRA, merge_to_lora
from ..utils.io import atomic_dir
from ..utils.safety import save_safetensors
from .formats import REPORT_FILE

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"

#: PEFT task type -> (transformers auto-class mapping, class-name suffix, heads PEFT saves for it)
_TASKS = {
    "CAUSAL_LM": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "ForCausalLM", ()),
    "SEQ_CLS": (
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        "ForSequenceClassification",
        ("classifier", "score"),
    ),
    "TOKEN_CLS": (
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
        "ForTokenClassification",
        ("classifier", "score"),
    ),
    "QUESTION_ANS": ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "ForQuestionAnswering", ("qa_outputs",)),
}


def export_peft_adapter(
    model: nn.Module,
    output_dir: str | Path,
    merge: str | None = None,
    *,
    calibration: Iterable[Batch] | None = None,
    eval_inputs: Iterable[Batch] | None = None,
    rank: int | None = None,
    modules_to_save: list[str] | None = None,
    distill_steps: int = DEFAULT_DISTILL_STEPS,
) -> MergedLoRA:
    """Merge ResLoRA into a plain LoRA and write it as a PEFT adapter directory.

    ``PeftModel.from_pretrained(base, output_dir)`` then computes ``W x + B' A' x`` in every
    adapted layer: exactly the merged model (``bs``/``none`` equal the ResLoRA model up to
    float round-off; ``is``/``ms`` differ by ``report.output_error`` on ``eval_inputs``).

    Args:
        model: a transformers (or any) model prepared with ``add_reslora``, traced by a forward.
        output_dir: the adapter directory (created; existing adapter files are replaced).
        merge, calibration, eval_inputs, rank, distill_steps: passed to
            :func:`~reslora_diffusers.merge_to_lora`.
        modules_to_save: module names whose full weights go into the adapter as PEFT
            ``modules_to_save``; default: the largest modules outside ResLoRA whose parameters
            all train (e.g. a classification head), plus the head PEFT expects for the task.

    Returns:
        The merged LoRA (``.report`` is what ``merge_report.json`` holds).
    """
    merged = merge_to_lora(
        model, merge, calibration=calibration, rank=rank, eval_inputs=eval_inputs, distill_steps=distill_steps
    )
    task_type, heads = _task(model)
    saved = _modules_to_save(model, modules_to_save, heads)
    tensors = {PREFIX + key: value.detach().to("cpu").contiguous() for key, value in merged.items()}
    for path in saved:
        for name, value in model.get_submodule(path).state_dict().items():
            tensors[f"{PREFIX}{path}.{name}"] = value.detach().to("cpu").clone().contiguous()
    peft_config = lora_config_for(model, merged, task_type, saved)
    with atomic_dir(output_dir) as tmp:
        save_safetensors(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        peft_config.save_pretrained(str(tmp))
        (tmp / REPORT_FILE).write_text(json.dumps(merged.report.to_dict(), indent=2, sort_keys=True))
    return merged


def lora_config_for(model: nn.Module, merged: MergedLoRA, task_type: str | None, modules_to_save: list[str]):
    """The ``peft.LoraConfig`` under which PEFT applies ``merged`` with scale ``lora_alpha / r = 1``."""
    from peft import LoraConfig

    state = get_state(model)
    ranks = dict(merged.report.ranks)
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(p): k for p, k in sorted(ranks.items(), key=lambda kv: -len(kv[0])) if k != r}
    return LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(ranks),
        lora_dropout=state.config.dropout,
        fan_in_fan_out=any(state.blocks[p].fan_in_fan_out for p in ranks),
        bias="none",
        task_type=task_type,
        modules_to_save=modules_to_save or None,
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        inference_mode=True,
    )


def _task(model: nn.Module) -> tuple[str | None, tuple[str, ...]]:
    """The PEFT task type of a transformers head class (``GPT2LMHeadModel`` is ``CAUSAL_LM``)."""
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for task, (mapping, suffix, heads) in _TASKS.items():
        if name.endswith(suffix) or name in getattr(modeling_auto, mapping, {}).values():
            return task, heads
    return None, ()


def _modules_to_save(model: nn.Module, names: list[str] | None, heads: tuple[str, ...]) -> list[str]:
    """Full paths of the modules saved whole: ``names`` (or the trained ones) and the task heads.

    Head names are matched as PEFT does (path ends with the name); no path lies inside another.
    """
    modules = dict(model.named_modules())
    if names is None:
        chosen = _trained_modules(model)
    else:
        chosen = [p for n in names for p in modules if p == n or p.endswith("." + n)]
        missing = [n for n in names if not any(p == n or p.endswith("." + n) for p in modules)]
        if missing:
            raise ValueError(
                f"export_peft_adapter: modules_to_save {missing[0]!r} names no module of the model"
            )
    chosen += [p for p in modules if p and any(p.endswith(h) for h in heads)]
    out: list[str] = []
    for path in sorted(set(chosen), key=len):
        if not any(path.startswith(kept + ".") for kept in out):
            _check_no_block(path, modules[path])
            out.append(path)
    return sorted(out)


def _trained_modules(model: nn.Module) -> list[str]:
    """The largest modules, holding no ResLoRA block, all of whose parameters require grad."""
    found: list[str] = []
    for path, module in model.named_modules():
        params = list(module.parameters())
        if (
            path
            and params
            and all(p.requires_grad for p in params)
            and not any(isinstance(m, ResLoRALayer) for m in module.modules())
            and not any(path.startswith(f + ".") for f in found)
        ):
            found.append(path)
    return found


def _check_no_block(path: str, module: nn.Module) -> None:
    inner = next((m.module_path for m in module.modules() if isinstance(m, ResLoRALayer)), None)
    if inner is not None:
        raise ValueError(
            f"export_peft_adapter: modules_to_save entry {path!r} contains the ResLoRA layer {inner}; "
            "its merged LoRA is exported already, so save a smaller module"
        )
