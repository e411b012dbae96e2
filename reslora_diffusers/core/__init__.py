"""The ResLoRA core: config, block, chains, shortcuts, merges and checkpoints.

The maths lives here once; the diffusers, text-encoder and transformers front ends call it.
"""

from .checkpoint import checkpoint_configs, load_reslora_checkpoint, save_reslora_checkpoint
from .config import MERGE_METHODS, RES_TYPES, ResLoRAConfig
from .layer import ResLoRALinear
from .merge import MergedLoRA, MergeReport, compare_merges, merge_to_lora, merged_view, relative_error
from .model import add_reslora, chain_structure, remove_reslora, reslora_chains, trainable_parameters

__all__ = [
    "MERGE_METHODS",
    "RES_TYPES",
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
    "merged_view",
    "relative_error",
    "remove_reslora",
    "reslora_chains",
    "save_reslora_checkpoint",
    "trainable_parameters",
]
