"""``merge="distill"``: refine a merged plain LoRA by gradient steps on the ResLoRA model's outputs.

The calibrated merge fits each block's ``A'_n`` alone, by least squares on its own
intermediate; what it cannot represent (``x_{n-1}`` is no linear function of ``x_n`` in a
non-linear network) adds up along the chains. Distillation fits all factors together, on
the quantity that matters, the model's output: starting from the calibrated (``A', B'``), it
minimises

    L(A', B') = ||f(x_b; A', B') - f_ResLoRA(x_b)||^2 / ||f_ResLoRA(x_b)||^2

with Adam, one calibration batch ``x_b`` per step (in turn), where ``f(x; A', B')`` is the
model with every adapted layer computing ``W x + B' A' x`` (:func:`~.error.merged_view`) and
``f_ResLoRA`` the trained model itself (the UNet's noise prediction, a language model's
logits: :func:`~.error.output_tensor`). The ranks stay those of the merge. Each factor's
step size is ``lr`` times its own RMS, so one ``lr`` suits factors of any magnitude. The
result is never worse than the start on the calibration batches: if the fit ends above the
calibrated merge's error there, the calibrated factors are kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
import torch.nn as nn

from .error import Batch, merged_view, output_tensor, reference_outputs, relative_error, run_batch

logger = logging.getLogger(__name__)

#: Adam steps of ``merge="distill"`` (chosen by measurement on the tiny UNet and the NLG example, README)
DEFAULT_DISTILL_STEPS = 200
#: Adam step size relative to each factor's RMS
DEFAULT_DISTILL_LR = 1e-2


@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode with gradients on, and no gradient into the model's own parameters."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def distill(
    model: nn.Module,
    merged: dict[str, torch.Tensor],
    batches: list[Batch],
    steps: int = DEFAULT_DISTILL_STEPS,
    lr: float = DEFAULT_DISTILL_LR,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The distilled factors (same keys and shapes as ``merged``) and what the fit did.

    Returns ``(factors, info)`` with ``info``: ``steps``, ``lr`` and the relative output error
    on ``batches`` before and after (``calibration_error_before`` / ``_after``).
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"distill_steps={steps!r} must be an integer >= 0")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"distill lr={lr!r} must be a number > 0")
    batches = list(batches)
    if not batches:
        raise ValueError("merge='distill' got an empty calibration iterable")
    reference = reference_outputs(model, batches)
    before = relative_error(model, merged, batches, reference)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in merged.items()}
    groups = [
        {"params": [p], "lr": lr * max(float(p.detach().square().mean().sqrt()), 1e-8)}
        for p in params.values()
    ]
    optimizer = torch.optim.Adam(groups)
    with _frozen_eval(model), merged_view(model, params):
        for step in range(steps):
            i = step % len(batches)
            out = output_tensor(run_batch(model, batches[i]))
            ref = reference[i]
            loss = (out.double() - ref).square().sum() / ref.square().sum().clamp_min(1e-30)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    fitted = {k: v.detach() for k, v in params.items()}
    after = relative_error(model, fitted, batches, reference)
    if not after <= before:  # also catches NaN: keep the calibrated factors
        fitted, after = {k: v.detach() for k, v in merged.items()}, before
    logger.info("distilled merge: calibration error %.3e -> %.3e in %d steps", before, after, steps)
    info = {"steps": steps, "lr": lr, "calibration_error_before": before, "calibration_error_after": after}
    return fitted, info
