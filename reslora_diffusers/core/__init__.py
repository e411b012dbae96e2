"""The ResLoRA core: config, chains, layers, shortcut types, attach/detach, checkpoints, LoRA key
names (:mod:`.keys`) and the shortcut schedule (:mod:`.schedule`).

The maths of the method lives here once and imports nothing else of the package (merges,
front ends and exports build on it through the public names below).
"""

from .chain import Chain, Step, chain_key
from .checkpoint import checkpoint_configs, load_checkpoint, save_reslora_checkpoint
from .config import CALIBRATED_METHODS, MERGE_METHODS, ResLoRAConfig
from .inject import (
    ResLoRAState,
    attach_reslora,
    chain_structure,
    detach_reslora,
    find_targets,
    get_state,
    has_reslora,
    matches_target,
    reslora_chains,
    set_shortcut_scale,
    shortcut_scale,
    traced_state,
    trainable_parameters,
)
from .keys import lora_factors, lora_key, lora_paths, prefixed
from .layers import (
    ResLoRAConv1D,
    ResLoRAConv2d,
    ResLoRALayer,
    ResLoRALinear,
    is_conv1d,
    layer_class_for,
    register_layer,
)
from .schedule import DEFAULT_DECAY_START, SCHEDULES, check_schedule, shortcut_scale_at
from .shortcuts import get_shortcut, register_shortcut, res_types

__all__ = [
    "CALIBRATED_METHODS",
    "DEFAULT_DECAY_START",
    "MERGE_METHODS",
    "SCHEDULES",
    "Chain",
    "ResLoRAConfig",
    "ResLoRAConv1D",
    "ResLoRAConv2d",
    "ResLoRALayer",
    "ResLoRALinear",
    "ResLoRAState",
    "Step",
    "attach_reslora",
    "chain_key",
    "chain_structure",
    "check_schedule",
    "checkpoint_configs",
    "detach_reslora",
    "find_targets",
    "get_shortcut",
    "get_state",
    "has_reslora",
    "is_conv1d",
    "layer_class_for",
    "load_checkpoint",
    "lora_factors",
    "lora_key",
    "lora_paths",
    "matches_target",
    "prefixed",
    "register_layer",
    "register_shortcut",
    "res_types",
    "reslora_chains",
    "save_reslora_checkpoint",
    "set_shortcut_scale",
    "shortcut_scale",
    "shortcut_scale_at",
    "traced_state",
    "trainable_parameters",
]
