"""Turn a trained ResLoRA model into a plain LoRA, and measure what that costs.

Types with ``exact_merge`` (``bs``, ``none``) merge exactly. ``is`` and ``ms`` read
activations of earlier layers, which a plain LoRA cannot; three ways approximate them by a
function of ``x_n``:

* ``input`` (paper): ``x_{n-1} ~ alpha x_n`` with ``alpha = f_{n-1} / f_n``, ``f`` the mean
  of the block's norm window (of ``x`` for is, of ``A x`` for ms, paper eq. 12 for ms).
* ``weight`` (paper eq. 11): ``alpha = f*_{n-2} / f*_{n-1}`` with ``f*_j = ||W_j + dW_j||_F``
  of the already-merged layers (for lag k: ``f*_{n-k-1} / f*_{n-1}``); 1 where missing.
* ``calibrated`` / ``sequential`` (ours, :mod:`.calibration`): ``A'_n = A_n + G_n`` fitted by
  ridge least squares on calibration batches.
* ``distill`` (ours, :mod:`.distill`): the calibrated merge, then every factor refined by Adam
  steps so that the merged model's outputs match the ResLoRA model's on the calibration batches.

A model whose shortcut scale is 0 in every block (the end of a decaying
``--shortcut_schedule``) is a plain LoRA: every type then merges exactly, as ``none`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ..core import CALIBRATED_METHODS, MERGE_METHODS, ResLoRALayer, traced_state
from ..core.keys import lora_factors, lora_key
from .calibration import calibrate, calibrate_sequential
from .distill import DEFAULT_DISTILL_LR, DEFAULT_DISTILL_STEPS, distill
from .error import Batch, relative_error
from .lowrank import truncate

logger = logging.getLogger(__name__)


@dataclass
class MergeReport:
    """What a merge did and how far the merged model is from the ResLoRA model."""

    method: str
    res_type: str
    pre_num: int
    #: relative output error ||y_merged - y_reslora|| / ||y_reslora|| on the inputs given (lower is better)
    output_error: float | None = None
    #: merge scalar alpha* per block (input and weight merges)
    alphas: dict[str, float] = field(default_factory=dict)
    #: relative Frobenius error of dW per block from rank truncation
    truncation: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    #: every shortcut scale was 0: merged exactly as the plain LoRA the model is
    shortcuts_off: bool = False
    #: ``merge="distill"``: steps, lr and the relative output error on the calibration batches
    #: before (the calibrated merge) and after the fit; on ``eval_inputs`` too when given
    distill: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class MergedLoRA(dict):
    """A plain LoRA state dict (``<path>.lora_A.weight``, ``<path>.lora_B.weight``, ``dW = B @ A``)
    with the :class:`MergeReport` that made it as ``.report``."""

    report: MergeReport

    def factors(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        return lora_factors(self, path)


class _Context:
    """The :class:`~reslora_diffusers.core.shortcuts.MergeContext` of one merge."""

    def __init__(self, method: str, corrections: dict[ResLoRALayer, torch.Tensor]) -> None:
        self.method = method
        self.calibrated = method in CALIBRATED_METHODS
        self.corrections = corrections
        self.fstar: dict[ResLoRALayer, float] = {}
        self.alphas: dict[str, float] = {}

    def window_mean(self, block: ResLoRALayer) -> float:
        mean = block.window_mean()
        if mean is None:
            raise ValueError(
                f"merge='input' needs the norm window of {block.module_path}, but it recorded no "
                "training forward pass; train with ResLoRAConfig(record_norms=True) (or merge='input'), "
                "or use merge='calibrated' or 'weight'"
            )
        return float(mean)

    def weight_ratio(self, block: ResLoRALayer, lag: int) -> float:
        chain = block.chain
        back = chain.preds(chain.position(block))
        if len(back) < lag:
            return 1.0
        far = chain.preds(back[lag - 1])
        if not far:
            return 1.0
        return self.fstar[chain.blocks[far[0]]] / self.fstar[chain.blocks[back[0]]]

    def correction(self, block: ResLoRALayer) -> torch.Tensor:
        return self.corrections[block]

    def record_alpha(self, block: ResLoRALayer, alpha: float) -> None:
        self.alphas[block.module_path] = float(alpha)


def merge_to_lora(
    model: nn.Module,
    merge: str | None = None,
    calibration: Iterable[Batch] | None = None,
    rank: int | None = None,
    eval_inputs: Iterable[Batch] | None = None,
    ridge: float = 1e-6,
    distill_steps: int = DEFAULT_DISTILL_STEPS,
    distill_lr: float = DEFAULT_DISTILL_LR,
) -> MergedLoRA:
    """Merge the shortcuts away and return a plain LoRA with its :class:`MergeReport`.

    Args:
        model: a model prepared with ``add_reslora`` that ran at least one forward pass.
        merge: ``input | weight | calibrated | sequential | distill``; default: the config's ``merge``.
            ``sequential`` is ``calibrated`` fitted block by block on the partly merged model
            (:func:`~.calibration.calibrate_sequential`): a lower error for one forward per
            block and batch. ``distill`` refines the calibrated (and truncated) factors by
            ``distill_steps`` Adam steps on the calibration batches (:func:`~.distill.distill`).
        calibration: batches (tensor, tuple or dict) for ``calibrated``/``sequential``/``distill``;
            run in eval mode.
        rank: truncate every merged ``dW`` to this rank by SVD (errors in ``report.truncation``).
        eval_inputs: held-out batches on which ``report.output_error`` is measured.
        ridge: ``lambda`` of the calibrated fit, relative to the mean eigenvalue of ``X X^T``.
        distill_steps, distill_lr: the Adam steps and relative step size of ``merge="distill"``.
    """
    state = traced_state(model)
    method = merge or state.config.merge
    if method not in MERGE_METHODS:
        raise ValueError(f"merge={method!r} is invalid; allowed: {' | '.join(MERGE_METHODS)}")
    off = state.shortcuts_off()
    exact = state.shortcut.exact_merge or off
    corrections = {}
    if method in CALIBRATED_METHODS and calibration is not None:
        calibration = list(calibration)
    if method in CALIBRATED_METHODS and not exact:
        if calibration is None:
            raise ValueError(f"merge={method!r} needs calibration batches (calibration=...)")
        fit = calibrate_sequential if method == "sequential" else calibrate
        corrections = fit(model, calibration, ridge)
    ctx = _Context(method, corrections)
    factors = _merge_factors(state, ctx, off)
    report = MergeReport(
        method, state.config.res_type, state.config.pre_num, alphas=ctx.alphas, shortcuts_off=off
    )
    merged = MergedLoRA()
    for block, (a, b) in factors.items():
        if rank is not None:
            a, b, report.truncation[block.module_path] = truncate(a, b, rank)
        merged[lora_key(block.module_path, "A")] = a.contiguous()
        merged[lora_key(block.module_path, "B")] = b.contiguous()
        report.ranks[block.module_path] = a.shape[0]
    merged.report = report
    if method == "distill" and not (exact and not any(report.truncation.values())):
        if calibration is None:
            raise ValueError("merge='distill' needs calibration batches (calibration=...)")
        eval_inputs = None if eval_inputs is None else list(eval_inputs)
        held_out_before = None if eval_inputs is None else relative_error(model, merged, eval_inputs)
        fitted, report.distill = distill(model, merged, calibration, distill_steps, distill_lr)
        merged.update({k: v.contiguous() for k, v in fitted.items()})
        if held_out_before is not None:
            report.distill["held_out_error_before"] = held_out_before
    if eval_inputs is not None:
        report.output_error = relative_error(model, merged, eval_inputs)
        if report.distill:
            report.distill["held_out_error_after"] = report.output_error
        # DEBUG: the report carries it, and export_lora logs one line for all components
        what = "LoRA, nothing to merge" if state.shortcut.plain else f"{state.shortcut.label}, {method} merge"
        logger.debug("%s: relative output error %.3e", what, report.output_error)
    return merged


def _merge_factors(
    state, ctx: _Context, shortcuts_off: bool = False
) -> dict[ResLoRALayer, tuple[torch.Tensor, torch.Tensor]]:
    """``(A', B')`` per block, chain by chain in execution order (the weight merge reads the
    merged norms ``f*`` of earlier blocks). With ``shortcuts_off`` every block is merged as a
    chain's first block, which has no shortcut term: the plain LoRA ``(A_n, s B_n)``."""
    factors = {}
    with torch.no_grad():
        for chain in state.chains.values():
            for pos, block in enumerate(chain.blocks):
                preds = [] if shortcuts_off else [chain.blocks[p] for p in chain.preds(pos)]
                a, b = state.shortcut.merged_factors(block, preds, ctx)
                factors[block] = (a, b)
                w = block.base_weight().detach()
                ctx.fstar[block] = float(torch.linalg.vector_norm(w.to(b.dtype) + block.delta_weight(a, b)))
        for block in state.untraced_blocks():  # never ran in the traced pass: plain LoRA
            factors[block] = (block.lora_A.detach().clone(), block.lora_B.detach() * block.scaling)
    return factors


def has_norm_windows(model: nn.Module) -> bool:
    """Whether every block of ``model`` recorded the norm window that ``merge="input"`` reads
    (``ResLoRAConfig.record_norms``; needless for types that merge exactly)."""
    state = traced_state(model)
    if state.shortcut.exact_merge:
        return True
    return all(int(b.norm_count) > 0 for b in state.blocks.values())


def compare_merges(
    model: nn.Module,
    eval_inputs: list[Batch],
    calibration: list[Batch] | None = None,
    methods: Iterable[str] = MERGE_METHODS,
    **kwargs,
) -> dict[str, float]:
    """Relative output error of each merge method on ``eval_inputs`` (methods that cannot run
    for lack of data are left out: ``calibrated`` without batches, ``input`` without recorded
    norm windows)."""
    out = {}
    for method in methods:
        if method in CALIBRATED_METHODS and calibration is None:
            continue
        if method == "input" and not has_norm_windows(model):
            continue
        merged = merge_to_lora(model, method, calibration=calibration, eval_inputs=eval_inputs, **kwargs)
        out[method] = merged.report.output_error
    return out
