"""Speed settings of a training run: ``torch.compile``, TF32 and the fused AdamW.

ResLoRA's chains are traced by the first forward pass after ``add_reslora`` (the pass fills
Python lists and logs the structure once). Compiling before that pass would make dynamo
trace the tracing itself: a graph break at the log call and a second graph once the chains
are frozen. :func:`compile_model` therefore runs that pass eagerly first (eval mode, no
gradients, so no norm statistics are recorded and dropout is off), then compiles; every
later pass is the same Python path, one graph with no break and no recompilation.

Under gradient checkpointing dynamo traces each checkpointed region as a subgraph, which it
refuses when the region mutates Python state (ResLoRA's chains record the pass in lists) unless
``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint`` is set: then the
forward's bookkeeping is done once and the recomputation in backward, part of the compiled
graph, is the tensor work alone, which is what ResLoRA needs (a recomputed block must read
what its first run read). :func:`compile_model` sets it; without it every checkpointed region
ran eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn as nn
from torch._dynamo import config as dynamo_config

from ..core import get_state, has_reslora
from ..frontends import frontend_for
from ..utils.errors import one_line

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def trace_chains(model: nn.Module, inputs: dict | None = None) -> None:
    """Run the ResLoRA tracing pass of ``model`` now, eagerly, if it has not run yet.

    ``inputs``: keyword arguments of one forward call; default: the model family's synthetic
    inputs (the chain links depend on which blocks share shapes, not on the batch or image size).
    """
    if not has_reslora(model) or get_state(model).traced():
        return
    if inputs is None:
        inputs = frontend_for(model).synthetic_inputs(model, num=1)[0]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(**inputs)
    model.train(was_training)


def compile_model(
    model: nn.Module,
    mode: str = "default",
    backend: str | Callable = "inductor",
    inputs: dict | None = None,
) -> nn.Module:
    """``torch.compile(model)`` after ResLoRA's tracing pass (see the module doc).

    ``backend``: a dynamo backend's name or the backend itself (a callable taking the captured
    graph and its example inputs, as ``torch.compile`` accepts); ``mode`` applies to inductor.

    The returned module shares its parameters with ``model``; merges, exports and checkpoints
    take ``model`` itself (the compiled wrapper's module paths carry a ``_orig_mod.`` prefix).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: allowed {' | '.join(COMPILE_MODES)}")
    trace_chains(model, inputs)
    if has_reslora(model):  # see the module doc: checkpointed regions compile only with it
        dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    # inductor takes ``mode``; the debugging backends (eager, aot_eager) accept none
    kwargs = {"mode": mode} if backend == "inductor" and mode != "default" else {}
    logger.info("torch.compile(%s, backend=%s, mode=%s)", type(model).__name__, backend, mode)
    return torch.compile(model, backend=backend, **kwargs)


def fused_adam_supported(device: torch.device) -> bool:
    """Whether the fused AdamW kernel is used by default on ``device`` (CUDA only: on CPU the
    fused kernel exists in recent torch but is not faster than the default ``foreach`` one)."""
    return torch.device(device).type == "cuda"


def make_adamw(
    params, use_fused: bool | None, device: torch.device, use_8bit: bool = False, **hparams
) -> torch.optim.Optimizer:
    """AdamW over ``params``; ``use_fused`` None picks the fused kernel where it is supported.

    ``use_8bit``: bitsandbytes' ``AdamW8bit``, which keeps both moments of every tensor of 4096
    elements or more in 8 bits with blockwise scales (a quarter of float32 AdamW's state; LoRA
    factors smaller than that keep 32-bit state). ``ValueError`` naming the package when it is
    not installed or has no build for this machine, and with ``use_fused=True``.
    """
    if use_8bit:
        if use_fused:
            raise ValueError("--use_8bit_adam and --use_fused_adam are two optimizers; choose one")
        return adamw_8bit_class()(params, **hparams)
    fused = fused_adam_supported(device) if use_fused is None else use_fused
    return torch.optim.AdamW(params, fused=True, **hparams) if fused else torch.optim.AdamW(params, **hparams)


def adamw_8bit_class() -> type[torch.optim.Optimizer]:
    """bitsandbytes' ``AdamW8bit``; ``ValueError`` naming the package where it does not load."""
    try:
        import bitsandbytes
    except Exception as err:  # ImportError, or a build that fails to load its native library
        raise ValueError(
            "--use_8bit_adam needs bitsandbytes (pip install bitsandbytes), which does not load here: "
            + one_line(err)
        ) from err
    return bitsandbytes.optim.AdamW8bit


def allow_tf32() -> None:
    """TF32 tensor-core matmuls and convolutions on Ampere and newer GPUs (no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
