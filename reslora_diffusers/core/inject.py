"""Attach ResLoRA to a module tree and take it off again.

:func:`attach_reslora` is the model-agnostic step the front ends build on: it wraps every
adaptable layer whose path ends with a target (see :mod:`.layers` for the kinds) and
installs the hooks that empty the chains' caches around every forward pass. The public
entry point for users is :func:`reslora_diffusers.add_reslora`, which picks the front end.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .chain import Chain, chain_key, log_structure
from .config import ResLoRAConfig
from .fusion import InputGroups
from .layers import ResLoRALayer, layer_class_for
from .shortcuts import Shortcut, get_shortcut

logger = logging.getLogger(__name__)

STATE_ATTR = "_reslora_state"


@dataclass
class ResLoRAState:
    """What :func:`attach_reslora` keeps on the model: config, shortcut, chains, blocks, hooks."""

    config: ResLoRAConfig
    shortcut: Shortcut
    chains: dict[str, Chain]
    blocks: dict[str, ResLoRALayer]
    requires_grad: dict[str, bool]
    #: blocks that read the same input and apply ``A`` as one product (:mod:`.fusion`)
    inputs: InputGroups = field(default_factory=InputGroups)
    hooks: list = field(default_factory=list)
    logged: bool = False
    #: the modules of the model (itself included) that carry a ``gradient_checkpointing`` flag
    checkpoint_flags: list[nn.Module] = field(default_factory=list)
    #: the current pass is a training pass under gradient checkpointing, run eagerly: backward
    #: recomputes its checkpointed regions
    recomputed: bool = False

    def checkpointing(self) -> bool:
        """Whether the model recomputes blocks in backward (gradient checkpointing is on).

        This is what diffusers' ``is_gradient_checkpointing`` and transformers'
        ``is_activation_checkpointing`` compute, ``any(m.gradient_checkpointing for m in
        model.modules())``, without their walk over every module on every pass (about 1 ms per
        pass on a small UNet, a few percent of a compiled step): both libraries' ``enable``
        functions set the flag only on modules that already carry it, so those are found once.
        """
        return any(m.gradient_checkpointing for m in self.checkpoint_flags)

    def traced(self) -> bool:
        return all(c.frozen for c in self.chains.values())

    def shortcuts_off(self) -> bool:
        """Every block's shortcut scale is exactly 0: the model is a plain LoRA."""
        return all(float(b.shortcut_scale) == 0.0 for b in self.blocks.values())

    def untraced_blocks(self) -> list[ResLoRALayer]:
        """Blocks that did not run in the traced pass (they act as plain LoRA)."""
        return [b for b in self.blocks.values() if b.chain.position(b) is None]


def matches_target(path: str, targets: list[str]) -> str | None:
    """The first target that ``path`` ends with on a ``.`` boundary (as PEFT matches), or None."""
    return next((t for t in targets if path == t or path.endswith("." + t)), None)


def find_targets(
    model: nn.Module, targets: list[str], exclude: list[str] | None = None
) -> list[tuple[str, str]]:
    """``(module path, matched target)`` for every adaptable layer whose path ends with a target
    and is not one of the ``exclude`` paths."""
    found, names = [], []
    for name, module in model.named_modules():
        if isinstance(module, ResLoRALayer) or layer_class_for(module) is None or name in (exclude or ()):
            continue
        names.append(name)
        target = matches_target(name, targets)
        if target is not None:
            found.append((name, target))
    if not found:
        sample = ", ".join(names[:8]) or "none"
        raise ValueError(
            f"add_reslora: no linear or convolution layer of {type(model).__name__} ends with any of "
            f"target_modules {list(targets)}; searched {len(names)} layers (e.g. {sample})"
        )
    return found


def attach_reslora(model: nn.Module, config: ResLoRAConfig) -> nn.Module:
    """Wrap every layer whose name ends with one of ``config.target_modules`` in a ResLoRA layer.

    The model is changed in place and returned: all its parameters are frozen and only the
    ``lora_A``/``lora_B`` of the new blocks train. Chains are traced by the first forward pass.
    """
    if not isinstance(config, ResLoRAConfig):
        raise TypeError(f"add_reslora expects a ResLoRAConfig, got {type(config).__name__}")
    if has_reslora(model):
        raise ValueError("add_reslora: this model already has ResLoRA; call remove_reslora first")
    if config.target_modules is None:
        raise ValueError(
            f"ResLoRAConfig.target_modules is None and {type(model).__name__} has no preset; "
            "pass target_modules (module-name suffixes such as ['q_proj', 'v_proj'])"
        )
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    shortcut = get_shortcut(config.res_type, config.pre_num)
    chains: dict[str, Chain] = {}
    blocks: dict[str, ResLoRALayer] = {}
    inputs = InputGroups()
    for name, target in targets:
        key = chain_key(name, target)
        chain = chains.setdefault(key, Chain(key, shortcut))
        base = model.get_submodule(name)
        block = layer_class_for(base)(base, config, name, chain, inputs)
        _set_submodule(model, name, block)
        blocks[name] = block
    state = ResLoRAState(config, shortcut, chains, blocks, requires_grad, inputs)
    state.checkpoint_flags = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    state.hooks = [
        model.register_forward_pre_hook(lambda m, args: _begin_pass(m)),
        model.register_forward_hook(lambda m, args, out: _end_pass(m)),
    ]
    setattr(model, STATE_ATTR, state)
    method = shortcut.label + (
        f" (pre_num {config.pre_num})" if shortcut.uses_pre_num and not shortcut.plain else ""
    )
    logger.info("%s, rank %d, on %d modules in %d chains", method, config.rank, len(blocks), len(chains))
    return model


def detach_reslora(model: nn.Module) -> nn.Module:
    """Put the original modules back and restore each parameter's ``requires_grad``."""
    state = get_state(model)
    for name, block in state.blocks.items():
        _set_submodule(model, name, block.base_layer)
    for hook in state.hooks:
        hook.remove()
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, p.requires_grad))
    delattr(model, STATE_ATTR)
    return model


def get_state(model: nn.Module) -> ResLoRAState:
    """The :class:`ResLoRAState` of a model with ResLoRA (``ValueError`` otherwise)."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no ResLoRA; call add_reslora first")
    return state


def traced_state(model: nn.Module) -> ResLoRAState:
    """:func:`get_state`, requiring that a forward pass (or a checkpoint) fixed the chains."""
    state = get_state(model)
    if not state.traced():
        raise RuntimeError("ResLoRA chains are traced by a forward pass: run the model once first")
    return state


def has_reslora(model: nn.Module) -> bool:
    return hasattr(model, STATE_ATTR)


def reslora_chains(model: nn.Module) -> dict[str, list[ResLoRALayer]]:
    """One list of blocks per chain (role), in forward-execution order.

    The order is traced, so at least one forward pass must have run (or the structure
    must come from a loaded checkpoint).
    """
    return {name: list(chain.blocks) for name, chain in traced_state(model).chains.items()}


def chain_structure(model: nn.Module) -> dict[str, dict]:
    """The chains as data: module paths, links and segments per chain (JSON-serialisable)."""
    return {name: chain.describe() for name, chain in traced_state(model).chains.items()}


def set_shortcut_scale(model: nn.Module, scale: float) -> None:
    """Multiply every shortcut term of the model by ``scale`` (``c``):

    ``is``: ``B_n A_n (x_n + c x_{n-1})``; ``ms``: ``B_n (A_n x_n + c sum_k A_{n-k} x_{n-k})``;
    ``bs``: ``(B_n A_n + c sum_k B_{n-k} A_{n-k}) x_n``. ``c = 1`` is the paper's ResLoRA and
    ``c = 0`` a plain LoRA with the same factors (which every merge then exports exactly).
    The value is written into each block's ``shortcut_scale`` buffer in place, so a compiled
    model sees it without recompiling; it is saved in state dicts and ResLoRA checkpoints.
    """
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"set_shortcut_scale: scale must be a finite number, got {scale!r}")
    with torch.no_grad():
        for block in get_state(model).blocks.values():
            block.shortcut_scale.fill_(float(scale))


def shortcut_scale(model: nn.Module) -> float:
    """The shortcut scale ``c`` of the model's blocks (the largest, should blocks have been set apart)."""
    return max(float(b.shortcut_scale) for b in get_state(model).blocks.values())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for b in get_state(model).blocks.values() for p in (b.lora_A, b.lora_B)]


def _begin_pass(model: nn.Module) -> None:
    state = getattr(model, STATE_ATTR)
    # Under gradient checkpointing an eager pass is recomputed in backward, which reads what the
    # forward cached (Chain's module doc); compiled, the recomputation is part of the graph.
    checkpointed = model.training and torch.is_grad_enabled() and state.checkpointing()
    compiled = torch.compiler.is_compiling()
    state.recomputed = checkpointed and not compiled
    reads = checkpointed and state.shortcut.reads_activations
    for chain in state.chains.values():
        if not chain.frozen:
            chain.reset_trace()
        chain.new_pass(reads, compiled, ahead_ok=state.config.dropout == 0)
    if state.inputs.traced:
        state.inputs.freeze()
    else:
        state.inputs.reset()
    state.inputs.new_pass()


def _end_pass(model: nn.Module) -> None:
    state = getattr(model, STATE_ATTR)
    for chain in state.chains.values():
        if not chain.frozen:
            chain.freeze()
        if not chain.keep:  # a kept pass's cache serves backward's recomputation
            chain.new_pass()
    state.inputs.end_trace()
    if not state.inputs.frozen and not state.recomputed:
        # a traced pass recomputed in backward must save there what its forward saved: its
        # groups start with the next pass
        state.inputs.freeze()
    state.inputs.new_pass()
    if not state.logged:
        state.logged = True
        log_structure(state.chains, [b.module_path for b in state.untraced_blocks()])


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)
