"""reslora-diffusers: ResLoRA for diffusers, transformers and PEFT users."""

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

__all__ = [
    "MergeReport",
    "MergedLoRA",
    "ResLoRAConfig",
    "ResLoRALinear",
    "add_reslora",
    "chain_structure",
    "checkpoint_configs",
    "compare_merges",
    "load_reslora_checkpoint",
    "merge_to_lora",
    "remove_reslora",
    "reslora_chains",
    "save_reslora_checkpoint",
    "trainable_parameters",
]
