"""reslora-diffusers: ResLoRA for diffusers, transformers and PEFT users.

Layout: :mod:`.core` (the method), :mod:`.merge` (plain LoRA out), :mod:`.objectives` (the
losses the families train with), :mod:`.frontends` (one file per model and diffusion family),
:mod:`.export` (one file per file format), :mod:`.training` (the training script's parts: the
run folder, data, flags), :mod:`.integrations` (the HF Trainer).
"""

from .api import add_reslora, load_reslora_checkpoint, remove_reslora
from .core import (
    ResLoRAConfig,
    ResLoRALayer,
    ResLoRALinear,
    chain_structure,
    checkpoint_configs,
    register_shortcut,
    res_types,
    reslora_chains,
    save_reslora_checkpoint,
    set_shortcut_scale,
    shortcut_scale,
    trainable_parameters,
)
from .export import export_lora, export_peft_adapter
from .merge import MergedLoRA, MergeReport, compare_merges, merge_to_lora

__version__ = "0.1.0"

__all__ = [
    "MergeReport",
    "MergedLoRA",
    "ResLoRAConfig",
    "ResLoRALayer",
    "ResLoRALinear",
    "add_reslora",
    "chain_structure",
    "checkpoint_configs",
    "compare_merges",
    "export_lora",
    "export_peft_adapter",
    "load_reslora_checkpoint",
    "merge_to_lora",
    "register_shortcut",
    "remove_reslora",
    "res_types",
    "reslora_chains",
    "save_reslora_checkpoint",
    "set_shortcut_scale",
    "shortcut_scale",
    "trainable_parameters",
]
