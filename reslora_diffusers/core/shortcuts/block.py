"""``bs`` (block shortcut): ``h_n = W_n x_n + s (B_n A_n + c sum_{k=1..m} B_{n-k} A_{n-k}) x_n``,
``c`` the shortcut scale."""

from __future__ import annotations

import torch

from . import register_shortcut
from .base import Shortcut


@register_shortcut
class BlockShortcut(Shortcut):
    """Block n applies the earlier blocks' whole branches to its own input.

    The sum is one product of stacked factors ``[B_n, c B_{n-1} .. c B_{n-m}] [A_n; ..; A_{n-m}]``,
    which is also the exact merge (rank ``(k+1) r`` for ``k`` predecessors). Links need equal
    factor shapes.
    """

    name = "bs"
    uses_pre_num = True

    @property
    def max_preds(self) -> int:
        return self.pre_num

    def link_ok(self, step, block, x):
        prev = step.chain.blocks[step.pos - 1]
        return prev.lora_A.shape == block.lora_A.shape and prev.lora_B.shape == block.lora_B.shape

    def a_weight(self, block, preds):
        if not preds:
            return block.lora_A
        return torch.cat([block.lora_A] + [p.lora_A for p in preds], dim=0)

    def b_weight(self, block, preds):
        if not preds:
            return block.lora_B
        return torch.cat([block.lora_B] + [block.shortcut_scale * p.lora_B for p in preds], dim=1)

    def own_ax(self, block, ax):
        return ax.narrow(block.feature_dim, 0, block.rank)

    def merged_factors(self, block, preds, ctx):
        with torch.no_grad():
            return self.a_weight(block, preds).clone(), self.b_weight(block, preds) * block.scaling
