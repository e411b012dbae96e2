"""Turn a trained ResLoRA model into a plain LoRA, and measure what that costs.

``bs`` and ``none`` merge exactly. ``is`` and ``ms`` read activations of earlier layers,
which a plain LoRA cannot; three ways approximate them by a function of ``x_n``:

* ``input`` (paper): ``x_{n-1} ~ alpha x_n`` with ``alpha = f_{n-1} / f_n``, ``f`` the mean
  of the block's norm window (of ``x`` for is, of ``A x`` for ms, paper eq. 12 for ms).
* ``weight`` (paper eq. 11): ``alpha = f*_{n-2} / f*_{n-1}`` with ``f*_j = ||W_j + dW_j||_F``
  of the already-merged layers (for lag k: ``f*_{n-k-1} / f*_{n-1}``); 1 where missing.
* ``calibrated`` (ours): ridge least squares ``G_n = Z X^T (X X^T + lambda I)^-1`` from the
  block's input ``x_n`` to the shortcut's intermediate ``z_n`` over calibration batches;
  ``A'_n = A_n + G_n``. Lags whose input equals ``x_n`` (cross-attention k/v) take
  ``G = A_{n-k}`` exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .config import CALIBRATED_METHODS, MERGE_METHODS
from .layer import ResLoRALinear
from .model import _traced_state, get_state

logger = logging.getLogger(__name__)

Batch = torch.Tensor | tuple | list | dict


@dataclass
class MergeReport:
    """What a merge did and how far the merged model is from the ResLoRA model."""

    method: str
    res_type: str
    pre_num: int
    #: relative output error ||y_merged - y_reslora|| / ||y_reslora|| on the inputs given
    fidelity: float | None = None
    #: merge scalar alpha* per block (input and weight merges)
    alphas: dict[str, float] = field(default_factory=dict)
    #: relative Frobenius error of dW per block from rank truncation
    truncation: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class MergedLoRA(dict):
    """A plain LoRA state dict (``<path>.lora_A.weight``, ``<path>.lora_B.weight``, ``dW = B @ A``)
    with the :class:`MergeReport` that made it as ``.report``."""

    report: MergeReport

    def factors(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self[f"{path}.lora_A.weight"], self[f"{path}.lora_B.weight"]


def run_batch(model: nn.Module, batch: Batch):
    """Call ``model`` the way calibration and evaluation batches are specified."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def output_tensor(out) -> torch.Tensor:
    """The main tensor of a model output (a tensor, ``.sample``, ``.logits``, a dict or tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("sample", "logits", "last_hidden_state"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")


class MergeContext:
    """Per-merge helpers the shortcut classes call: window means, weight ratios, corrections."""

    def __init__(self, corrections: dict[ResLoRALinear, torch.Tensor] | None = None) -> None:
        self.corrections = corrections or {}
        self.fstar: dict[ResLoRALinear, float] = {}
        self.alphas: dict[str, float] = {}

    def window_mean(self, block: ResLoRALinear, stat: str) -> float:
        mean = block.window_mean()
        if mean is None:
            raise ValueError(
                f"merge='input' needs the norm window of {block.module_path}, but it recorded no "
                "training forward pass; train first (model.train()) or use merge='calibrated' or 'weight'"
            )
        return float(mean)

    def weight_ratio(self, block: ResLoRALinear, lag: int) -> float:
        """``f*_{n-lag-1} / f*_{n-1}``, 1 where either layer is missing from the segment."""
        chain = block._chain
        back = chain.preds(block._pos)
        if len(back) < lag:
            return 1.0
        far = chain.preds(back[lag - 1])
        if not far:
            return 1.0
        return self.fstar[chain.blocks[far[0]]] / self.fstar[chain.blocks[back[0]]]

    def correction(self, block: ResLoRALinear) -> torch.Tensor:
        return self.corrections[block]

    def record_alpha(self, block: ResLoRALinear, alpha: float) -> None:
        self.alphas[block.module_path] = float(alpha)


def merge_to_lora(
    model: nn.Module,
    merge: str | None = None,
    calibration: Iterable[Batch] | None = None,
    rank: int | None = None,
    eval_inputs: Iterable[Batch] | None = None,
    ridge: float = 1e-6,
) -> MergedLoRA:
    """Merge the shortcuts away and return a plain LoRA with its :class:`MergeReport`.

    Args:
        model: a model prepared with ``add_reslora`` that ran at least one forward pass.
        merge: ``input | weight | calibrated | sequential``; default: the config's ``merge``.
            ``sequential`` is ``calibrated`` fitted block by block on the partly merged model
            (:func:`calibrate_sequential`): a lower error for one forward per block and batch.
        calibration: batches (tensor, tuple or dict) for ``calibrated``/``sequential``; run in eval mode.
        rank: truncate every merged ``dW`` to this rank by SVD (errors in ``report.truncation``).
        eval_inputs: held-out batches on which ``report.fidelity`` is measured.
        ridge: ``lambda`` of the calibrated fit, relative to the mean eigenvalue of ``X X^T``.
    """
    state = _traced_state(model)
    method = merge or state.config.merge
    if method not in MERGE_METHODS:
        raise ValueError(f"merge={method!r} is invalid; allowed: {' | '.join(MERGE_METHODS)}")
    corrections = {}
    if method in CALIBRATED_METHODS and state.config.res_type in ("is", "ms"):
        if calibration is None:
            raise ValueError(f"merge={method!r} needs calibration batches (calibration=...)")
        fit = calibrate_sequential if method == "sequential" else calibrate
        corrections = fit(model, calibration, ridge)
    ctx = MergeContext(corrections)
    factors = _merge_factors(state, method, ctx)
    report = MergeReport(method, state.config.res_type, state.config.pre_num, alphas=ctx.alphas)
    if rank is not None:
        factors = {b: _truncate(b.module_path, a, bm, rank, report) for b, (a, bm) in factors.items()}
    merged = MergedLoRA()
    for block, (a, b) in factors.items():
        merged[f"{block.module_path}.lora_A.weight"] = a.contiguous()
        merged[f"{block.module_path}.lora_B.weight"] = b.contiguous()
        report.ranks[block.module_path] = a.shape[0]
    merged.report = report
    if eval_inputs is not None:
        report.fidelity = relative_error(model, merged, eval_inputs)
        logger.info(
            "ResLoRA %s merge (%s): relative output error %.3e", method, report.res_type, report.fidelity
        )
    return merged


def _merge_factors(
    state, method: str, ctx: MergeContext
) -> dict[ResLoRALinear, tuple[torch.Tensor, torch.Tensor]]:
    factors = {}
    with torch.no_grad():
        for chain in state.chains.values():
            for pos, block in enumerate(chain.blocks):
                preds = [chain.blocks[p] for p in chain.preds(pos)]
                a, b = block.shortcut.merged_factors(block, preds, method, ctx)
                factors[block] = (a, b)
                w = block.base_weight().detach()
                ctx.fstar[block] = float(torch.linalg.matrix_norm(w.to(b.dtype) + b @ a))
        for block in state.blocks.values():
            if block._pos is None:  # never ran in the traced pass: plain LoRA
                factors[block] = (block.lora_A.detach().clone(), block.lora_B.detach() * block.scaling)
    return factors


def _truncate(path: str, a: torch.Tensor, b: torch.Tensor, rank: int, report: MergeReport):
    """Best rank-``rank`` factors of ``B @ A`` via QR of both factors and a small SVD."""
    if a.shape[0] <= rank:
        report.truncation[path] = 0.0
        return a, b
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().t())
    u, s, vh = torch.linalg.svd(rb @ ra.t())
    root = s[:rank].sqrt()
    new_b = (qb @ u[:, :rank]) * root
    new_a = root[:, None] * (vh[:rank] @ qa.t())
    total = float(s.square().sum())
    report.truncation[path] = math.sqrt(float(s[rank:].square().sum()) / total) if total > 0 else 0.0
    return new_a.to(a.dtype), new_b.to(b.dtype)


@contextlib.contextmanager
def merged_view(model: nn.Module, merged: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, adapted layers compute ``W x + B' A' x`` from ``merged`` (no shortcuts)."""
    blocks = get_state(model).blocks
    try:
        for path, block in blocks.items():
            key = f"{path}.lora_A.weight"
            if key in merged:
                block._merged = (merged[key], merged[f"{path}.lora_B.weight"])
        yield
    finally:
        for block in blocks.values():
            block._merged = None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def reference_outputs(model: nn.Module, inputs: Iterable[Batch]) -> list[torch.Tensor]:
    """The ResLoRA model's outputs (eval mode, float64) on ``inputs``."""
    with eval_mode(model):
        return [output_tensor(run_batch(model, batch)).double() for batch in inputs]


def relative_error(
    model: nn.Module,
    merged: dict[str, torch.Tensor],
    inputs: Iterable[Batch],
    reference: list[torch.Tensor] | None = None,
) -> float:
    """``||y_merged - y_reslora|| / ||y_reslora||`` over all batches (norms summed in squares).

    ``reference`` (from :func:`reference_outputs` on the same inputs) saves recomputing ``y_reslora``.
    """
    inputs = list(inputs)
    reference = reference if reference is not None else reference_outputs(model, inputs)
    num = den = 0.0
    with eval_mode(model), merged_view(model, merged):
        for batch, ref in zip(inputs, reference, strict=True):
            got = output_tensor(run_batch(model, batch)).double()
            num += float((got - ref).square().sum())
            den += float(ref.square().sum())
    if not (math.isfinite(num) and math.isfinite(den)):
        return math.nan  # NaN/Inf outputs: never report them as a perfect merge
    return math.sqrt(num / den) if den > 0 else 0.0


def compare_merges(
    model: nn.Module,
    eval_inputs: list[Batch],
    calibration: list[Batch] | None = None,
    methods: Iterable[str] = MERGE_METHODS,
    **kwargs,
) -> dict[str, float]:
    """Relative output error of each merge method on ``eval_inputs`` (methods that cannot run
    for lack of data, e.g. ``calibrated`` without batches, are left out)."""
    out = {}
    for method in methods:
        if method in CALIBRATED_METHODS and calibration is None:
            continue
        merged = merge_to_lora(model, method, calibration=calibration, eval_inputs=eval_inputs, **kwargs)
        out[method] = merged.report.fidelity
    return out


# -- calibration ----------------------------------------------------------------------
class _CalibStats:
    """Accumulates ``X X^T`` and, per lag k, ``Z_k X^T`` (or notes that ``x_{n-k} == x_n``)."""

    def __init__(self, block: ResLoRALinear) -> None:
        n_in = block.in_features
        self.xxt = torch.zeros(n_in, n_in, dtype=torch.float64, device=block.lora_A.device)
        self.zxt: dict[int, torch.Tensor] = {}
        self.identical: dict[int, bool] = {}
        self.lag_blocks: dict[int, ResLoRALinear] = {}

    @torch.no_grad()
    def observe(self, block: ResLoRALinear, x: torch.Tensor, pred_pos: list[int]) -> None:
        x2 = x.reshape(-1, x.shape[-1]).double()
        self.xxt += x2.t() @ x2
        for k, (a_src, same, z) in enumerate(_shortcut_terms(block, x, pred_pos), start=1):
            self.identical[k] = self.identical.get(k, True) and same
            self.lag_blocks[k] = a_src
            self.zxt[k] = self.zxt.get(k, 0) + z.t() @ x2

    def solve(self, ridge: float) -> torch.Tensor:
        total = 0
        fitted = [k for k in self.zxt if not self.identical[k]]
        if fitted:
            total = _ridge_solve(self.xxt, sum(self.zxt[k] for k in fitted), ridge)
        for k in self.zxt:
            if self.identical[k]:
                total = total + self.lag_blocks[k].lora_A.detach().double()
        return total


def _shortcut_terms(block: ResLoRALinear, x: torch.Tensor, pred_pos: list[int]):
    """Per lag k: the block whose A reads the earlier input, whether that input is ``x``
    itself (cross-attention text states), and ``z_k`` (``A_n x_{n-1}`` for is,
    ``A_{n-k} x_{n-k}`` for ms) as (tokens, r) float64."""
    chain = block._chain
    for pos in pred_pos:
        x_prev = chain.xs[pos]
        a_src = block if block.shortcut.name == "is" else chain.blocks[pos]
        same = x_prev is x or (x_prev.shape == x.shape and torch.equal(x_prev, x))
        yield a_src, same, x_prev.reshape(-1, x_prev.shape[-1]).double() @ a_src.lora_A.double().t()


def _ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``G = rhs (gram + lambda I)^-1``, ``lambda`` = ``ridge`` x the mean eigenvalue of ``gram``."""
    lam = ridge * float(torch.trace(gram)) / gram.shape[0] + 1e-12
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, rhs.t()).t()


def _shortcut_blocks(model: nn.Module) -> list[ResLoRALinear]:
    """The blocks that have a shortcut input (every block of a chain but its first)."""
    state = _traced_state(model)
    return [b for c in state.chains.values() for pos, b in enumerate(c.blocks) if c.preds(pos)]


def _calibration_batches(batches: Iterable[Batch], method: str) -> list[Batch]:
    batches = list(batches)
    if not batches:
        raise ValueError(f"merge={method!r} got an empty calibration iterable")
    return batches


def calibrate(
    model: nn.Module, batches: Iterable[Batch], ridge: float = 1e-6
) -> dict[ResLoRALinear, torch.Tensor]:
    """The calibrated correction ``G_n`` of every block that has a shortcut input."""
    stats = {block: _CalibStats(block) for block in _shortcut_blocks(model)}
    _run_observed(model, _calibration_batches(batches, "calibrated"), stats)
    return {block: s.solve(ridge).to(block.lora_A.dtype) for block, s in stats.items()}


class _StopForward(Exception):
    """Ends a calibration forward once the block being fitted has seen its input."""


class _Targets:
    """Reference pass, per block and batch: the ResLoRA intermediate ``u_n = A_n x_n + z_n``
    without the lags whose input is ``x_n`` itself (cross-attention text states), which are
    kept as exact terms ``A_src`` with the input they assume; and the blocks' run order."""

    def __init__(self) -> None:
        self.u: dict[ResLoRALinear, list[torch.Tensor]] = {}
        self.exact: dict[ResLoRALinear, list[ResLoRALinear]] = {}
        self.inputs: dict[ResLoRALinear, list[torch.Tensor]] = {}
        self.order: list[ResLoRALinear] = []

    @torch.no_grad()
    def observe(self, block: ResLoRALinear, x: torch.Tensor, pred_pos: list[int]) -> None:
        u = x.reshape(-1, x.shape[-1]).double() @ block.lora_A.double().t()
        exact = []
        for a_src, same, z in _shortcut_terms(block, x, pred_pos):
            if same:
                exact.append(a_src)
            else:
                u = u + z
        if block not in self.u:
            self.order.append(block)
            self.u[block], self.inputs[block] = [], []
            self.exact[block] = exact
        elif exact != self.exact[block]:  # identical in one batch only: fit those lags too
            raise _Inconsistent(block)
        self.u[block].append(u)
        if exact:
            self.inputs[block].append(x.detach())


class _Inconsistent(Exception):
    def __init__(self, block: ResLoRALinear) -> None:
        super().__init__(f"{block.module_path}: shortcut input identical in some calibration batches only")


class _Grab:
    """Captures the fitted block's input in the partly merged model, then stops the pass."""

    x: torch.Tensor | None = None

    def observe(self, block: ResLoRALinear, x: torch.Tensor, pred_pos: list[int]) -> None:
        self.x = x
        raise _StopForward


def calibrate_sequential(
    model: nn.Module, batches: Iterable[Batch], ridge: float = 1e-6
) -> dict[ResLoRALinear, torch.Tensor]:
    """Calibrated corrections fitted one block at a time, in execution order (as GPTQ does).

    Block n's ``G_n`` solves ``min ||(A_n + G_n) x~_n - u_n||^2 + lambda ||G_n||^2`` where
    ``x~_n`` is its input when every earlier block already runs its merged factors and
    ``u_n = A_n x_n + z_n`` the ResLoRA model's intermediate: the fit also absorbs the drift
    that earlier approximate merges cause. One forward per block and batch, stopped at the
    block. Lags whose earlier input is ``x_n`` itself (cross-attention ``to_k``/``to_v``) add
    their ``A`` exactly while ``x~_n == x_n``, as in :func:`calibrate`.
    """
    batches = _calibration_batches(batches, "sequential")
    targets = _Targets()
    try:
        _run_observed(model, batches, dict.fromkeys(_shortcut_blocks(model), targets))
    except _Inconsistent as err:
        raise ValueError(f"merge='sequential': {err}") from err
    corrections: dict[ResLoRALinear, torch.Tensor] = {}
    merged: dict[str, torch.Tensor] = {}
    for block in targets.order:
        corrections[block] = _fit_on_merged(model, block, batches, targets, merged, ridge)
        merged[f"{block.module_path}.lora_A.weight"] = block.lora_A.detach() + corrections[block]
        merged[f"{block.module_path}.lora_B.weight"] = block.lora_B.detach() * block.scaling
    return corrections


def _fit_on_merged(model, block, batches, targets: _Targets, merged: dict, ridge: float) -> torch.Tensor:
    """``G_n`` of :func:`calibrate_sequential` for one block, given the blocks merged so far."""
    a = block.lora_A.detach().double()
    exact = sum((src.lora_A.detach().double() for src in targets.exact[block]), torch.zeros_like(a))
    gram = torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64, device=a.device)
    rxt = torch.zeros_like(a)  # sum of (u - A x~)^T x~
    exact_rxt = torch.zeros_like(a)  # sum of (A_exact x)^T x~: the exact lags' share of the target
    unchanged = True
    grab = _Grab()
    with merged_view(model, merged):
        for i, batch in enumerate(batches):
            _run_observed(model, [batch], {block: grab})
            x2 = grab.x.reshape(-1, grab.x.shape[-1]).double()
            gram += x2.t() @ x2
            rxt += (targets.u[block][i] - x2 @ a.t()).t() @ x2
            if targets.exact[block]:
                x_ref = targets.inputs[block][i]
                unchanged = unchanged and torch.equal(grab.x, x_ref)
                exact_rxt += (x_ref.reshape(-1, x_ref.shape[-1]).double() @ exact.t()).t() @ x2
    if unchanged:  # the exact lags' input is this block's input: add their A, fit the rest
        return (_ridge_solve(gram, rxt, ridge) + exact).to(block.lora_A.dtype)
    return _ridge_solve(gram, rxt + exact_rxt, ridge).to(block.lora_A.dtype)


def _run_observed(model: nn.Module, batches: list[Batch], observers: dict) -> None:
    """Run ``batches`` in eval mode with ``observers`` ({block: observer}) attached."""
    try:
        for block, observer in observers.items():
            block._calib = observer
        with eval_mode(model):
            for batch in batches:
                with contextlib.suppress(_StopForward):
                    run_batch(model, batch)
    finally:
        for block in observers:
            block._calib = None
