"""The four shortcut types, one class each: forward term, what it caches, when a link
exists, and how it merges into a plain LoRA.

Every block computes ``delta_n = s * B_stack (mid_n)`` where ``mid_n`` is built from
``ax_n = A_stack x_n`` (``A_stack``/``B_stack`` are ``A_n``/``B_n`` except for ``bs``):

======  ==============================  ===========================================
type    A_stack / B_stack               mid_n
======  ==============================  ===========================================
none    A_n / B_n                       A_n x_n
is      A_n / B_n                       A_n x_n + A_n x_{n-1}
bs      [A_n; ..; A_{n-m}] / [B_n..]    the stacked product (sum_k B_{n-k} A_{n-k} x_n)
ms      A_n / B_n                       A_n x_n + sum_{k=1..m} A_{n-k} x_{n-k}
======  ==============================  ===========================================

Merges return ``(A', B')`` with the scaling baked into ``B'`` so that ``dW_n = B' A'``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .config import CALIBRATED_METHODS

if TYPE_CHECKING:
    from .layer import ResLoRALinear
    from .merge import MergeContext

Factors = tuple[torch.Tensor, torch.Tensor]


class Shortcut:
    """Plain LoRA (``res_type="none"``): no shortcut; also the base of the others."""

    name = "none"
    #: which per-block statistic the norm window records ("x", "ax" or None)
    stat: str | None = None

    def __init__(self, pre_num: int) -> None:
        self.pre_num = pre_num

    @property
    def max_preds(self) -> int:
        return 0

    def link_ok(self, prev: ResLoRALinear, block: ResLoRALinear, x: torch.Tensor, ax: torch.Tensor) -> bool:
        """May the previous block of the chain feed this one? (``prev`` ran just before.)"""
        return False

    def a_weight(self, block: ResLoRALinear, preds: list[ResLoRALinear]) -> torch.Tensor:
        return block.lora_A

    def b_weight(self, block: ResLoRALinear, preds: list[ResLoRALinear]) -> torch.Tensor:
        return block.lora_B

    def mid(self, block, preds, pred_pos, x, ax) -> torch.Tensor:
        return ax

    def merged_factors(self, block, preds, method: str, ctx: MergeContext) -> Factors:
        return block.lora_A.detach(), block.lora_B.detach() * block.scaling


class _ScalarMergeShortcut(Shortcut, ABC):
    """Shortcuts that read earlier activations (``is``, ``ms``): merged by a scalar ``alpha``
    (``dW_n = s (1 + alpha) B_n A_n``, paper) or by the calibrated map (``A'_n = A_n + G_n``)."""

    @abstractmethod
    def input_alpha(self, block, preds, ctx: MergeContext) -> float:
        """``alpha`` of the input merge, from the norm windows."""

    @abstractmethod
    def weight_alpha(self, block, preds, ctx: MergeContext) -> float:
        """``alpha`` of the weight merge, from the merged weights' norms."""

    def merged_factors(self, block, preds, method, ctx):
        A, B = block.lora_A.detach(), block.lora_B.detach() * block.scaling
        if not preds:
            return A, B
        if method in CALIBRATED_METHODS:
            return A + ctx.correction(block), B
        alpha = (
            self.input_alpha(block, preds, ctx) if method == "input" else self.weight_alpha(block, preds, ctx)
        )
        ctx.record_alpha(block, alpha)
        return A, B * (1 + alpha)


class InputShortcut(_ScalarMergeShortcut):
    """``is``: ``h_n = W_n x_n + s B_n A_n (x_n + x_{n-1})``; one predecessor, equal input shapes."""

    name = "is"
    stat = "x"

    @property
    def max_preds(self) -> int:
        return 1

    def link_ok(self, prev, block, x, ax) -> bool:
        cached = prev._chain.xs[prev._pos]
        return cached is not None and cached.shape == x.shape

    def mid(self, block, preds, pred_pos, x, ax):
        if not preds:
            return ax
        x_prev = block._chain.xs[pred_pos[0]]
        _check_shape(block, preds[0], x_prev, x)
        return ax + F.linear(block.dropout(x_prev.to(block.lora_A.dtype)), block.lora_A)

    def input_alpha(self, block, preds, ctx):
        """``f_{n-1} / f_n`` of the input norm windows."""
        return ctx.window_mean(preds[0], "x") / ctx.window_mean(block, "x")

    def weight_alpha(self, block, preds, ctx):
        """``f*_{n-2} / f*_{n-1}`` (paper eq. 11)."""
        return ctx.weight_ratio(block, 1)


class BlockShortcut(Shortcut):
    """``bs``: ``h_n = W_n x_n + s (sum_{k=0..m} B_{n-k} A_{n-k}) x_n``; equal weight shapes.

    The sum is one product of stacked factors, and it is also the exact merge
    (rank ``(k+1) r`` for ``k`` predecessors).
    """

    name = "bs"

    @property
    def max_preds(self) -> int:
        return self.pre_num

    def link_ok(self, prev, block, x, ax) -> bool:
        return prev.lora_A.shape == block.lora_A.shape and prev.lora_B.shape == block.lora_B.shape

    def a_weight(self, block, preds):
        if not preds:
            return block.lora_A
        return torch.cat([block.lora_A] + [p.lora_A for p in preds], dim=0)

    def b_weight(self, block, preds):
        if not preds:
            return block.lora_B
        return torch.cat([block.lora_B] + [p.lora_B for p in preds], dim=1)

    def merged_factors(self, block, preds, method, ctx):
        with torch.no_grad():
            return self.a_weight(block, preds).clone(), self.b_weight(block, preds) * block.scaling


class MiddleShortcut(_ScalarMergeShortcut):
    """``ms``: ``h_n = W_n x_n + s B_n (sum_{k=0..m} A_{n-k} x_{n-k})``; equal ``A x`` shapes."""

    name = "ms"
    stat = "ax"

    @property
    def max_preds(self) -> int:
        return self.pre_num

    def link_ok(self, prev, block, x, ax) -> bool:
        cached = prev._chain.axs[prev._pos]
        return cached is not None and cached.shape == ax.shape

    def mid(self, block, preds, pred_pos, x, ax):
        chain = block._chain
        out = ax
        for p, pos in zip(preds, pred_pos):
            a_prev = chain.axs[pos]
            _check_shape(block, p, a_prev, ax)
            out = out + a_prev
        return out

    def input_alpha(self, block, preds, ctx):
        """``sum_k f_{n-k} / f_n`` of the ``A x`` norm windows (paper eq. 12)."""
        own = ctx.window_mean(block, "ax")
        return sum(ctx.window_mean(p, "ax") / own for p in preds)

    def weight_alpha(self, block, preds, ctx):
        """``sum_k f*_{n-k-1} / f*_{n-1}``: eq. 11's ratio at every lag."""
        return sum(ctx.weight_ratio(block, k) for k in range(1, len(preds) + 1))


SHORTCUTS: dict[str, type[Shortcut]] = {
    c.name: c for c in (Shortcut, InputShortcut, BlockShortcut, MiddleShortcut)
}


def _check_shape(block, pred, cached, current) -> None:
    if cached is None:
        raise RuntimeError(
            f"ResLoRA: {block.module_path} needs {pred.module_path} from the same forward pass, "
            "but that block has not run in this pass. Gradient checkpointing recomputes blocks "
            "out of order and is supported only for res_type 'none' and 'bs'."
        )
    if cached.shape != current.shape:
        raise ValueError(
            f"ResLoRA: shortcut {pred.module_path} -> {block.module_path} was traced with equal shapes "
            f"but now sees {tuple(cached.shape)} vs {tuple(current.shape)}"
        )
