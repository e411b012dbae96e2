"""ResLoRA for transformers models (NLG and NLU): presets, PEFT export and the Trainer callback.

``add_reslora_transformers`` is what :func:`reslora_diffusers.add_reslora` calls for a
``transformers.PreTrainedModel``; the maths is the core's.
"""

from __future__ import annotations

from .peft_export import export_peft_adapter
from .presets import PRESETS, add_reslora_transformers, preset_targets

__all__ = ["PRESETS", "ResLoRACallback", "add_reslora_transformers", "export_peft_adapter", "preset_targets"]


def __getattr__(name: str):
    if name == "ResLoRACallback":  # imports transformers; only on use
        from .trainer import ResLoRACallback

        return ResLoRACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
