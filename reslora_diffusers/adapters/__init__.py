"""Deprecated: the transformers front end moved to :mod:`reslora_diffusers.frontends`, the PEFT
export to :mod:`reslora_diffusers.export` and the Trainer callback to
:mod:`reslora_diffusers.integrations`. These names stay for one release."""

import warnings

from ..export.peft import export_peft_adapter
from ..frontends import PRESETS, preset_targets

warnings.warn(
    "reslora_diffusers.adapters is deprecated; use reslora_diffusers.frontends, .export and .integrations",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str):
    if name == "ResLoRACallback":  # imports transformers; only on use
        from ..integrations.trainer import ResLoRACallback

        return ResLoRACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PRESETS", "ResLoRACallback", "export_peft_adapter", "preset_targets"]
