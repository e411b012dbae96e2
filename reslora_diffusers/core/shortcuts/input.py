"""``is`` (input shortcut): ``h_n = W_n x_n + s B_n A_n (x_n + c x_{n-1})``, ``c`` the shortcut scale."""

from __future__ import annotations

import torch

from . import register_shortcut
from .base import ActivationShortcut, CalibrationTerm, check_cached


@register_shortcut
class InputShortcut(ActivationShortcut):
    """Block n also applies its own ``A_n`` to the previous block's input ``x_{n-1}``.

    One predecessor always (``pre_num`` does not apply); the link needs equal input shapes.
    """

    name = "is"
    stat = "x"
    caches = ("x",)
    folds_input = True

    @property
    def max_preds(self) -> int:
        return 1

    def link_ok(self, step, block, x):
        prev = step.chain.cached("x", step.pos - 1)
        return prev is not None and prev.shape == x.shape

    def a_input(self, block, step, xd):
        """``dropout(x_n) + c dropout(x_{n-1})``: ``A_n`` applies once to the sum (its two
        products would cost a second ``A`` product forward and two backward)."""
        if not step.preds:
            return xd
        x_prev = check_cached(block, step.pred_blocks[0], step.chain.cached("x", step.preds[0]), xd)
        return torch.addcmul(xd, block.shortcut_scale, block.dropout(x_prev))  # one operation

    def folded_inputs(self, block, step):
        return (step.chain.cached("x", step.preds[0]),) if step.preds else ()

    def calibration_terms(self, block, step):
        coeff = float(block.shortcut_scale)
        return [CalibrationTerm(block, step.chain.cached("x", p), coeff) for p in step.preds]

    def input_alpha(self, block, preds, ctx):
        """``f_{n-1} / f_n`` of the input norm windows."""
        return ctx.window_mean(preds[0]) / ctx.window_mean(block)

    def weight_alpha(self, block, preds, ctx):
        """``f*_{n-2} / f*_{n-1}`` (paper eq. 11)."""
        return ctx.weight_ratio(block, 1)
