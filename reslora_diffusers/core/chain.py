"""Chains: same-role ResLoRA blocks in forward-execution order, and their per-forward cache.

A chain is traced during the first forward pass after ``add_reslora``: blocks join it in
the order they run, and the link ``n-1 -> n`` is kept only where the shortcut type's shape
rule allows it (see :mod:`.shortcuts`). The structure is then frozen. Within one forward
pass the chain caches what later blocks need (``x_n`` for ``is``, ``A_n x_n`` for ``ms``);
the cache is emptied at the start and end of every pass of the root model, so nothing
from one step or one ``train()``/``eval()`` pass reaches the next.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .layer import ResLoRALinear

logger = logging.getLogger(__name__)

_INDEX = re.compile(r"^\d+$")


def chain_key(module_path: str, target: str) -> str:
    """The role of a target module: its path after the last numeric component, plus the target.

    ``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k`` -> ``attn2.to_k``;
    ``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``. Self- and cross-attention
    projections thus form separate chains, and so do BERT's attention and MLP ``dense``.
    """
    parent = module_path[: -len(target)].rstrip(".")
    parts = parent.split(".") if parent else []
    last = max((i for i, p in enumerate(parts) if _INDEX.match(p)), default=-1)
    return ".".join(parts[last + 1 :] + [target])


class Chain:
    """Blocks of one role in execution order, the links between them, and the pass cache."""

    def __init__(self, name: str, pre_num: int) -> None:
        self.name = name
        self.pre_num = pre_num
        self.blocks: list[ResLoRALinear] = []
        # links[i]: the shortcut block i-1 -> block i is allowed (links[0] is always False).
        self.links: list[bool | None] = []
        self.frozen = False
        self._preds: list[list[int]] = []
        self.new_pass()

    # -- per-forward cache ------------------------------------------------------------
    def new_pass(self) -> None:
        """Forget everything cached in the current forward pass."""
        n = len(self.blocks)
        self.ran: list[bool] = [False] * n
        self.xs: list[torch.Tensor | None] = [None] * n
        self.axs: list[torch.Tensor | None] = [None] * n

    # -- tracing ----------------------------------------------------------------------
    def enter(self, block: ResLoRALinear) -> int | None:
        """Register that ``block`` runs now; returns its position (None: not in the chain)."""
        pos = block._pos
        if not self.frozen:
            if pos is None:
                pos = self._append(block)
            elif self.ran[pos]:
                # The block runs a second time without the root model's hooks in between:
                # the traced pass is complete (submodule called directly).
                self.freeze()
                self.new_pass()
        elif pos is None:
            return None
        elif self.ran[pos]:
            self.new_pass()
        self.ran[pos] = True
        return pos

    def _append(self, block: ResLoRALinear) -> int:
        pos = len(self.blocks)
        block._pos = pos
        self.blocks.append(block)
        self.links.append(False if pos == 0 else None)
        self.ran.append(False)
        self.xs.append(None)
        self.axs.append(None)
        return pos

    def decide_link(self, pos: int, ok: bool) -> None:
        if self.links[pos] is None:
            self.links[pos] = bool(ok)

    def reset_trace(self) -> None:
        """Drop an unfinished trace (a traced forward that raised)."""
        for block in self.blocks:
            block._pos = None
        self.blocks, self.links, self._preds = [], [], []
        self.new_pass()

    def freeze(self) -> None:
        self.links = [bool(x) for x in self.links]
        self._preds = [self._walk_back(pos) for pos in range(len(self.blocks))]
        self.frozen = True

    def set_structure(self, blocks: list[ResLoRALinear], links: list[bool]) -> None:
        """Install a known structure (from a checkpoint) instead of tracing it."""
        self.reset_trace()
        for block, link in zip(blocks, links):
            self._append(block)
            self.links[-1] = bool(link) and len(self.blocks) > 1
        self.freeze()
        self.new_pass()

    # -- structure --------------------------------------------------------------------
    def preds(self, pos: int) -> list[int]:
        """Positions of the linked predecessors of ``pos``, nearest first (at most pre_num)."""
        if self.frozen:
            return self._preds[pos]
        return self._walk_back(pos)

    def _walk_back(self, pos: int) -> list[int]:
        out = []
        while len(out) < self.pre_num and pos > 0 and self.links[pos]:
            pos -= 1
            out.append(pos)
        return out

    def segments(self) -> list[list[str]]:
        """Module paths grouped into runs of linked blocks."""
        segs: list[list[str]] = []
        for block, link in zip(self.blocks, self.links):
            if link and segs:
                segs[-1].append(block.module_path)
            else:
                segs.append([block.module_path])
        return segs

    def describe(self) -> dict:
        return {
            "modules": [b.module_path for b in self.blocks],
            "links": [bool(x) for x in self.links],
            "segments": self.segments(),
        }


def log_structure(chains: dict[str, Chain], unreached: list[str]) -> None:
    for name, chain in chains.items():
        sizes = [len(s) for s in chain.segments()]
        logger.info(
            "ResLoRA chain %s: %d blocks in %d segments %s", name, len(chain.blocks), len(sizes), sizes
        )
    if unreached:
        logger.warning(
            "ResLoRA: %d adapted modules did not run in the traced forward and act as plain LoRA: %s",
            len(unreached),
            ", ".join(unreached[:5]) + (" ..." if len(unreached) > 5 else ""),
        )
