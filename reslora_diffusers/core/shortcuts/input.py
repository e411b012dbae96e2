"""``is`` (input shortcut): ``h_n = W_n x_n + s B_n A_n (x_n + c x_{n-1})``, ``c`` the shortcut scale."""

from __future__ import annotations

import torch

from . import register_shortcut
from .base import ActivationShortcut, CalibrationTerm, check_cached


@register_shortcut
class InputShortcut(ActivationShortcut):
    """Block n also applies its own ``A_n`` to the previous block's input ``x_{n-1}``.

    One predecessor always (``pre_num`` does not apply); the link needs equal input shapes.

    Two ways to compute the same term:

    * folded (every pass but the one below): ``A_n (x_n + c x_{n-1})``, one ``A`` product of the
      sum, reading ``x_{n-1}`` from the chain's cache;
    * lookahead (training under gradient checkpointing, once the chain is traced): block ``n-1``
      stacks its successor's rows, ``[A_{n-1}; A_n] x_{n-1}``, and caches ``A_n x_{n-1}``;
      block ``n`` adds ``c A_n x_{n-1}`` to its own ``A_n x_n``. What a checkpointed region
      keeps for the next one is then ``r`` features per token instead of ``x_{n-1}``.
    """

    name = "is"
    stat = "x"
    caches = ("x",)
    kept_caches = ("x",)  # while the chain is traced; afterwards "ahead"
    looks_ahead = True
    folds_input = True

    @property
    def max_preds(self) -> int:
        return 1

    def link_ok(self, step, block, x):
        prev = step.chain.cached("x", step.pos - 1)
        return prev is not None and prev.shape == x.shape

    def a_weight(self, block, preds):
        """``A_n``, with the successor's ``A_{n+1}`` stacked below in a lookahead pass."""
        ahead = block.chain.ahead_blocks(block)
        return torch.cat([block.lora_A] + [b.lora_A for b in ahead]) if ahead else block.lora_A

    def a_input(self, block, step, xd):
        """``dropout(x_n) + c dropout(x_{n-1})``: ``A_n`` applies once to the sum (its two
        products would cost a second ``A`` product forward and two backward)."""
        if not step.preds or step.chain.lookahead:
            return xd
        x_prev = check_cached(block, step.pred_blocks[0], step.chain.cached("x", step.preds[0]), xd)
        return torch.addcmul(xd, block.shortcut_scale, block.dropout(x_prev))  # one operation

    def folded_inputs(self, block, step):
        return (step.chain.cached("x", step.preds[0]),) if step.preds and not step.chain.lookahead else ()

    def own_ax(self, block, ax):
        return ax.narrow(block.feature_dim, 0, block.rank) if ax.shape[block.feature_dim] > block.rank else ax

    def ahead_ax(self, block, ax):
        return (
            ax.narrow(block.feature_dim, block.rank, block.rank)
            if ax.shape[block.feature_dim] > block.rank
            else None
        )

    def mid(self, block, step, x, ax):
        """Folded: ``ax`` is already ``A_n (x_n + c x_{n-1})``. Lookahead: ``A_n x_n + c A_n x_{n-1}``,
        the second product computed by the predecessor."""
        if not step.chain.lookahead:
            return ax
        own = self.own_ax(block, ax)
        if not step.preds:
            return own
        ahead = check_cached(block, step.pred_blocks[0], step.chain.cached("ahead", step.preds[0]), own)
        return torch.addcmul(own, block.shortcut_scale, ahead)

    def calibration_terms(self, block, step):
        coeff = float(block.shortcut_scale)
        return [CalibrationTerm(block, step.chain.cached("x", p), coeff) for p in step.preds]

    def input_alpha(self, block, preds, ctx):
        """``f_{n-1} / f_n`` of the input norm windows."""
        return ctx.window_mean(preds[0]) / ctx.window_mean(block)

    def weight_alpha(self, block, preds, ctx):
        """``f*_{n-2} / f*_{n-1}`` (paper eq. 11)."""
        return ctx.weight_ratio(block, 1)
