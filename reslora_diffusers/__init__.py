"""reslora-diffusers: ResLoRA for diffusers, transformers and PEFT users.

Layout: :mod:`.core` (the method), :mod:`.merge` (plain LoRA out), :mod:`.frontends` (one
file per model family), :mod:`.export` (file formats), :mod:`.integrations` (training loops).
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
from .merge import MergedLoRA, MergeReport, compare_merges, merge_to_lora

__version__ = "0.1.0"

# The writers import diffusers/peft (seconds); load them on first use.
_LAZY = {
    "export_lora": "reslora_diffusers.export",
    "export_peft_adapter": "reslora_diffusers.export",
}


#: names that earlier releases had, and what replaced them. Asking for one raises ImportError
#: with the reason (an AttributeError would reach ``from ... import`` as a bare "cannot import").
REMOVED = {
    "ResLoRAAttnProcessor": "add_reslora(unet, config) keeps diffusers' own attention processors "
    "and applies the q/k/v A products as one (reslora_diffusers.core.fusion); no processor to install",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in REMOVED:
        raise ImportError(f"reslora_diffusers.{name} was removed: {REMOVED[name]}", name=name)
    raise AttributeError(f"module 'reslora_diffusers' has no attribute {name!r}")


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
