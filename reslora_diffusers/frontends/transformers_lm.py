"""transformers language models (NLG and NLU): default targets by ``model.config.model_type``.

The core matches targets as module-path suffixes on ``.`` boundaries (as PEFT does), and
forms one chain per role: the path after the last layer index plus the target, e.g.
``self_attn.q_proj`` or, for GPT-2, ``attn.c_proj`` and ``mlp.c_proj`` separately.
"""

from __future__ import annotations

import logging

import torch.nn as nn

from .base import FrontEnd, is_instance, register_frontend
from .clip_text import CLIP_MODEL_TYPES, CLIP_TEXT_TARGETS

logger = logging.getLogger(__name__)

_DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ENCODER = ("query", "key", "value", "attention.output.dense")

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
    **dict.fromkeys(CLIP_MODEL_TYPES, CLIP_TEXT_TARGETS),
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


class TransformersLM(FrontEnd):
    """Any ``transformers.PreTrainedModel``; targets from :data:`PRESETS` by model type."""

    name = "transformers"
    priority = 10

    def matches(self, model):
        return is_instance(model, "transformers", ("PreTrainedModel",))

    def default_targets(self, model: nn.Module) -> list[str]:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = preset_targets(model_type)
        logger.info("ResLoRA: preset target_modules for %s: %s", model_type, " ".join(targets))
        return targets


TRANSFORMERS_LM = register_frontend(TransformersLM())
