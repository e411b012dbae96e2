"""The calibrated merges: fit ``A'_n = A_n + G_n`` so that a plain LoRA reproduces the
shortcut's intermediate from the block's own input.

Per block, with ``X`` its inputs as rows (unfolded patches for convolutions) and ``Z`` the
shortcut's terms (:meth:`~reslora_diffusers.core.shortcuts.Shortcut.calibration_terms`):
``G_n = Z X^T (X X^T + lambda I)^-1`` (ridge least squares). Terms whose input is the block's
own input (cross-attention text states) are added exactly instead of fitted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn as nn

from ..core import ResLoRALayer, traced_state
from ..core.keys import lora_key
from ..core.shortcuts import CalibrationTerm
from .error import Batch, eval_mode, merged_view, run_batch


def _term_rows(term: CalibrationTerm) -> torch.Tensor:
    """``coeff * A_src x_src`` as ``(vectors, r)`` float64 rows."""
    src = term.source
    return term.coeff * (src.rows(term.x_src).double() @ src.a_matrix().detach().double().t())


def _identical(block: ResLoRALayer, x: torch.Tensor, term: CalibrationTerm) -> bool:
    """The term reads this block's own input through an ``A`` of the same shape, so it is
    exactly ``coeff * A_src x_n`` and needs no fit."""
    xs = term.x_src
    same_input = xs is x or (xs.shape == x.shape and torch.equal(xs, x))
    return same_input and term.source.lora_A.shape == block.lora_A.shape


def _exact_part(terms: list[CalibrationTerm], like: torch.Tensor) -> torch.Tensor:
    """``sum coeff * A_src`` of the exact terms as an ``(r, in_flat)`` float64 matrix."""
    total = torch.zeros_like(like)
    for term in terms:
        total = total + term.coeff * term.source.a_matrix().detach().double()
    return total


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``G = rhs (gram + lambda I)^-1``, ``lambda`` = ``ridge`` x the mean eigenvalue of ``gram``."""
    lam = ridge * float(torch.trace(gram)) / gram.shape[0] + 1e-12
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, rhs.t()).t()


class _OneShotFit:
    """Accumulates ``X X^T`` and, per shortcut term k, ``Z_k X^T`` of one block over the
    calibration batches, noting whether term k read the block's own input in every batch."""

    def __init__(self, block: ResLoRALayer) -> None:
        n_in = block.a_matrix().shape[1]
        self.gram = torch.zeros(n_in, n_in, dtype=torch.float64, device=block.lora_A.device)
        self.zxt: dict[int, torch.Tensor] = {}
        self.identical: dict[int, bool] = {}
        self.terms: dict[int, CalibrationTerm] = {}

    @torch.no_grad()
    def __call__(self, block: ResLoRALayer, x: torch.Tensor, step) -> None:
        rows = block.rows(x).double()
        self.gram += rows.t() @ rows
        for k, term in enumerate(block.shortcut.calibration_terms(block, step)):
            self.identical[k] = self.identical.get(k, True) and _identical(block, x, term)
            self.terms[k] = term
            self.zxt[k] = self.zxt.get(k, 0) + _term_rows(term).t() @ rows

    def solve(self, block: ResLoRALayer, ridge: float) -> torch.Tensor:
        fitted = [k for k in self.zxt if not self.identical[k]]
        g = torch.zeros(block.rank, self.gram.shape[0], dtype=torch.float64, device=self.gram.device)
        if fitted:
            g = ridge_solve(self.gram, sum(self.zxt[k] for k in fitted), ridge)
        g = g + _exact_part([self.terms[k] for k in self.zxt if self.identical[k]], g)
        return g.reshape(block.lora_A.shape).to(block.lora_A.dtype)


def shortcut_blocks(model: nn.Module) -> list[ResLoRALayer]:
    """The blocks that have a shortcut input (every linked block of a chain)."""
    state = traced_state(model)
    return [b for c in state.chains.values() for pos, b in enumerate(c.blocks) if c.preds(pos)]


def _batches(batches: Iterable[Batch], method: str) -> list[Batch]:
    batches = list(batches)
    if not batches:
        raise ValueError(f"merge={method!r} got an empty calibration iterable")
    return batches


class _StopForward(Exception):
    """Ends a calibration forward once the block being fitted has seen its input."""


def run_observed(model: nn.Module, batches: list[Batch], observers: dict[ResLoRALayer, object]) -> None:
    """Run ``batches`` in eval mode with ``observers`` ({block: callable}) attached."""
    handles = [block.add_observer(obs) for block, obs in observers.items()]
    try:
        with eval_mode(model):
            for batch in batches:
                with contextlib.suppress(_StopForward):
                    run_batch(model, batch)
    finally:
        for handle in handles:
            handle.remove()


def calibrate(
    model: nn.Module, batches: Iterable[Batch], ridge: float = 1e-6
) -> dict[ResLoRALayer, torch.Tensor]:
    """The calibrated correction ``G_n`` of every block that has a shortcut input."""
    fits = {block: _OneShotFit(block) for block in shortcut_blocks(model)}
    run_observed(model, _batches(batches, "calibrated"), fits)
    return {block: fit.solve(block, ridge) for block, fit in fits.items()}


class _Targets:
    """Reference pass, per block and batch: the ResLoRA intermediate ``u_n = A_n x_n + z_n``
    without the terms whose input is ``x_n`` itself (kept as exact terms with the input they
    assume); and the blocks' run order."""

    def __init__(self) -> None:
        self.u: dict[ResLoRALayer, list[torch.Tensor]] = {}
        self.exact: dict[ResLoRALayer, list[CalibrationTerm]] = {}
        self.inputs: dict[ResLoRALayer, list[torch.Tensor]] = {}
        self.order: list[ResLoRALayer] = []

    @torch.no_grad()
    def __call__(self, block: ResLoRALayer, x: torch.Tensor, step) -> None:
        u = block.rows(x).double() @ block.a_matrix().detach().double().t()
        exact = []
        for term in block.shortcut.calibration_terms(block, step):
            if _identical(block, x, term):
                exact.append(term)
            else:
                u = u + _term_rows(term)
        if block not in self.u:
            self.order.append(block)
            self.u[block], self.inputs[block] = [], []
            self.exact[block] = exact
        elif [t.source for t in exact] != [t.source for t in self.exact[block]]:
            raise ValueError(
                f"merge='sequential': {block.module_path}: shortcut input identical in some "
                "calibration batches only"
            )
        self.u[block].append(u)
        if exact:
            self.inputs[block].append(x.detach())


class _Grab:
    """Captures the fitted block's input in the partly merged model, then stops the pass."""

    x: torch.Tensor | None = None

    def __call__(self, block: ResLoRALayer, x: torch.Tensor, step) -> None:
        self.x = x
        raise _StopForward


def calibrate_sequential(
    model: nn.Module, batches: Iterable[Batch], ridge: float = 1e-6
) -> dict[ResLoRALayer, torch.Tensor]:
    """Calibrated corrections fitted one block at a time, in execution order (as GPTQ does).

    Block n's ``G_n`` solves ``min ||(A_n + G_n) x~_n - u_n||^2 + lambda ||G_n||^2`` where
    ``x~_n`` is its input when every earlier block already runs its merged factors and
    ``u_n = A_n x_n + z_n`` the ResLoRA model's intermediate: the fit also absorbs the drift
    that earlier approximate merges cause. One forward per block and batch, stopped at the
    block. Terms whose earlier input is ``x_n`` itself (cross-attention ``to_k``/``to_v``) add
    their ``A`` exactly while ``x~_n == x_n``, as in :func:`calibrate`.
    """
    batches = _batches(batches, "sequential")
    targets = _Targets()
    run_observed(model, batches, dict.fromkeys(shortcut_blocks(model), targets))
    corrections: dict[ResLoRALayer, torch.Tensor] = {}
    merged: dict[str, torch.Tensor] = {}
    for block in targets.order:
        corrections[block] = _fit_on_merged(model, block, batches, targets, merged, ridge)
        merged[lora_key(block.module_path, "A")] = block.lora_A.detach() + corrections[block]
        merged[lora_key(block.module_path, "B")] = block.lora_B.detach() * block.scaling
    return corrections


def _fit_on_merged(model, block, batches, targets: _Targets, merged: dict, ridge: float) -> torch.Tensor:
    """``G_n`` of :func:`calibrate_sequential` for one block, given the blocks merged so far."""
    a = block.a_matrix().detach().double()
    exact = _exact_part(targets.exact[block], a)
    gram = torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64, device=a.device)
    rxt = torch.zeros_like(a)  # sum of (u - A x~)^T x~
    exact_rxt = torch.zeros_like(a)  # sum of (A_exact x)^T x~: the exact terms' share of the target
    unchanged = True
    grab = _Grab()
    with merged_view(model, merged):
        for i, batch in enumerate(batches):
            run_observed(model, [batch], {block: grab})
            rows = block.rows(grab.x).double()
            gram += rows.t() @ rows
            rxt += (targets.u[block][i] - rows @ a.t()).t() @ rows
            if targets.exact[block]:
                x_ref = targets.inputs[block][i]
                unchanged = unchanged and torch.equal(grab.x, x_ref)
                exact_rxt += (block.rows(x_ref).double() @ exact.t()).t() @ rows
    if unchanged:  # the exact terms' input is this block's input: add their A, fit the rest
        g = ridge_solve(gram, rxt, ridge) + exact
    else:
        g = ridge_solve(gram, rxt + exact_rxt, ridge)
    return g.reshape(block.lora_A.shape).to(block.lora_A.dtype)
