"""``ms`` (middle shortcut): ``h_n = W_n x_n + s B_n (A_n x_n + c sum_{k=1..m} A_{n-k} x_{n-k})``,
``c`` the shortcut scale."""

from __future__ import annotations

import functools

import torch

from . import register_shortcut
from .base import ActivationShortcut, CalibrationTerm, check_cached


@register_shortcut
class MiddleShortcut(ActivationShortcut):
    """Block n adds the earlier blocks' intermediates ``A_{n-k} x_{n-k}`` before its ``B_n``.

    Links need equal ``A x`` shapes. The inputs are cached too, so the calibrated merge can
    tell when an earlier input is this block's own (cross-attention text states).
    """

    name = "ms"
    stat = "ax"
    caches = ("x", "ax")
    kept_caches = ("ax",)  # rank r: what crosses a checkpointed region's boundary
    uses_pre_num = True

    @property
    def max_preds(self) -> int:
        return self.pre_num

    def link_ok(self, step, block, x):
        prev = step.chain.cached("ax", step.pos - 1)
        return prev is not None and tuple(prev.shape) == block.ax_shape(x)

    def mid(self, block, step, x, ax):
        if not step.preds:
            return ax
        cached = [
            check_cached(block, pred, step.chain.cached("ax", pos), ax)
            for pred, pos in zip(step.pred_blocks, step.preds)
        ]
        earlier = functools.reduce(torch.add, cached)  # no 0 + t1 copy, as sum() would make
        return torch.addcmul(ax, block.shortcut_scale, earlier)

    def calibration_terms(self, block, step):
        coeff = float(block.shortcut_scale)
        return [CalibrationTerm(step.chain.blocks[p], step.chain.cached("x", p), coeff) for p in step.preds]

    def input_alpha(self, block, preds, ctx):
        """``sum_k f_{n-k} / f_n`` of the ``A x`` norm windows (paper eq. 12)."""
        own = ctx.window_mean(block)
        return sum(ctx.window_mean(p) / own for p in preds)

    def weight_alpha(self, block, preds, ctx):
        """``sum_k f*_{n-k-1} / f*_{n-1}``: eq. 11's ratio at every lag."""
        return sum(ctx.weight_ratio(block, k) for k in range(1, len(preds) + 1))
