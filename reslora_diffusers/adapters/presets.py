"""Target-module presets by transformers ``model_type``, and ``add_reslora`` for transformers models.

The core matches targets as module-path suffixes on ``.`` boundaries (as PEFT does), and
forms one chain per role: the path after the last layer index plus the target, e.g.
``self_attn.q_proj`` or, for GPT-2, ``attn.c_proj`` and ``mlp.c_proj`` separately.
"""

from __future__ import annotations

import dataclasses
import logging

import torch.nn as nn

from ..core import ResLoRAConfig
from ..core import model as core

logger = logging.getLogger(__name__)

_DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ENCODER = ("query", "key", "value", "attention.output.dense")
_CLIP_TEXT = ("q_proj", "k_proj", "v_proj", "out_proj")

#: ``model.config.model_type`` -> default ``target_modules``.
PRESETS: dict[str, tuple[str, ...]] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    # GPT-2's projections are transformers ``Conv1D`` (weight stored as (in, out)); the core handles them.
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    # ``attention.output.dense`` is the attention output; the MLP's ``output.dense`` is not targeted.
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "clip_text_model": _CLIP_TEXT,
    "clip_text_model_with_projection": _CLIP_TEXT,
}


def preset_targets(model_type: str) -> list[str]:
    """The preset ``target_modules`` of a transformers ``model_type``; ``ValueError`` if none."""
    if model_type not in PRESETS:
        raise ValueError(
            f"ResLoRA has no target-module preset for model_type {model_type!r}; known presets: "
            f"{', '.join(sorted(PRESETS))}. Pass ResLoRAConfig(target_modules=[...]) with the names of "
            "its linear layers."
        )
    return list(PRESETS[model_type])


def resolve_config(model: nn.Module, config: ResLoRAConfig) -> ResLoRAConfig:
    """``config`` with ``target_modules`` filled from the model type's preset when it is ``None``."""
    if config.target_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = preset_targets(model_type)
    logger.info("ResLoRA: preset target_modules for %s: %s", model_type, " ".join(targets))
    return dataclasses.replace(config, target_modules=targets)


def add_reslora_transformers(model: nn.Module, config: ResLoRAConfig) -> nn.Module:
    """Apply ResLoRA to a transformers model in place (``target_modules=None``: the preset).

    Every targeted ``nn.Linear`` / ``Conv1D`` computes ``W x_n + s * B_stack(mid_n)`` as in
    :class:`~reslora_diffusers.core.ResLoRALinear`; the chains are traced by the first forward.
    """
    return core.add_reslora(model, resolve_config(model, config))
