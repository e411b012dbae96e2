"""reslora-diffusers: ResLoRA for diffusers, transformers and PEFT users."""

from .adapters import export_peft_adapter
from .api import add_reslora, remove_reslora
from .core import (
    MergedLoRA,
    MergeReport,
    ResLoRAConfig,
    ResLoRALinear,
    chain_structure,
    checkpoint_configs,
    compare_merges,
    load_reslora_checkpoint,
    merge_to_lora,
    reslora_chains,
    save_reslora_checkpoint,
    trainable_parameters,
)

__version__ = "0.1.0"

# The diffusers front end imports diffusers (seconds); load it on first use.
_LAZY = {
    "ResLoRAAttnProcessor": "reslora_diffusers.diffusion",
    "export_lora": "reslora_diffusers.diffusion",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'reslora_diffusers' has no attribute {name!r}")


__all__ = [
    "MergeReport",
    "ResLoRAAttnProcessor",
    "export_lora",
    "MergedLoRA",
    "ResLoRAConfig",
    "ResLoRALinear",
    "add_reslora",
    "chain_structure",
    "checkpoint_configs",
    "compare_merges",
    "export_peft_adapter",
    "load_reslora_checkpoint",
    "merge_to_lora",
    "remove_reslora",
    "reslora_chains",
    "save_reslora_checkpoint",
    "trainable_parameters",
]
