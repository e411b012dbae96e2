"""Shared-input groups: blocks that read the same tensor one after another apply ``A`` as one product.

An attention layer calls its q, k and v projections on the very same tensor (diffusers' SD3
and Flux processors, transformers' attention, a LLaMA MLP's gate and up projections). Three
``A`` products of rank ``r`` cost three small matrix products forward and six backward, and
three gradients of width ``in`` summed into ``x``; one product with the stacked rows
``[A_q; A_k; A_v]`` costs one forward, two backward and one gradient of ``x``.

The groups are traced like the chains: in the first forward pass after ResLoRA is attached, a
block whose input is the tensor object the previous block read joins that block's group. Then
the group's first block computes ``x @ [A_stack_1; A_stack_2; ...]^T`` (each member's rows as its
shortcut type stacks them) and keeps each later member's slice, which the member takes when it
runs on the same tensor; a member that runs on another tensor computes its own product, so a
caller that breaks the pattern costs time, never correctness. Groups form only without LoRA
dropout (each block draws its own mask, as PEFT does).

A shortcut type that folds earlier inputs into ``A``'s input (``is``: ``A_n (x_n + c x_{n-1})``)
shares too: q, k and v of one attention read one ``x_n``, and their predecessors read one
``x_{n-1}``, so the first member folds once and applies the stacked rows to the sum. A later
member takes its slice only when its own folded tensors are the very ones the first member
folded (a chain link that differs, or another predecessor, computes its own), and the group
forms only when its members' scales ``c`` are equal then (:func:`~.inject.set_shortcut_scale`
sets every block alike; blocks of one group set apart later fold with the first member's ``c``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .layers import ResLoRALayer

logger = logging.getLogger(__name__)


class InputGroup:
    """Blocks that read one tensor, in execution order; the slices the first block computed."""

    def __init__(self, members: list[ResLoRALayer]) -> None:
        self.members = members
        self._reads: tuple[torch.Tensor | None, ...] = ()
        self._pending: list[torch.Tensor | None] = [None] * len(members)

    def apply_a(self, xin: torch.Tensor, a: torch.Tensor, reads: tuple) -> torch.Tensor:
        """The first member's ``A xin`` (its rows ``a``), computing the later members' in the
        same product and keeping them for :meth:`take`; ``reads`` is ``(x, *folded inputs)``,
        what ``xin`` was computed from."""
        rows = [a] + [m.a_rows() for m in self.members[1:]]
        ax = self.members[0].apply_a(xin, torch.cat(rows, dim=0))
        parts = ax.split([r.shape[0] for r in rows], dim=self.members[0].feature_dim)
        self._reads, self._pending = reads, [None, *parts[1:]]
        return parts[0]

    def take(self, index: int, reads: tuple) -> torch.Tensor | None:
        """Member ``index``'s ``A`` product when the first member computed it from these very
        tensors (``reads``: the member's ``x`` and folded inputs)."""
        ax, self._pending[index] = self._pending[index], None
        mine = self._reads
        shared = ax is not None and len(reads) == len(mine) and all(r is m for r, m in zip(reads, mine))
        if index == len(self.members) - 1:
            # the last slice is taken: forget the inputs here, in the forward (see Chain.done)
            self._reads = ()
        return ax if shared else None

    def clear(self) -> None:
        self._reads, self._pending = (), [None] * len(self.members)


class InputGroups:
    """The shared-input groups of one model: traced in its first forward pass, then fixed."""

    def __init__(self) -> None:
        self.groups: list[InputGroup] = []
        #: the traced pass is over (no block joins a group any more)
        self.traced = False
        #: the groups share their products (from the end of the traced pass, or under gradient
        #: checkpointing from the next pass on: the traced pass's recomputation in backward
        #: must save what its forward saved)
        self.frozen = False
        self._trace: list[list[ResLoRALayer]] = []
        self._eligible: list[list[ResLoRALayer]] = []
        self._seen: set[ResLoRALayer] = set()
        self._last: tuple[ResLoRALayer, torch.Tensor] | None = None

    def observe(self, block: ResLoRALayer, x: torch.Tensor) -> None:
        """Tracing: ``block`` runs on ``x``; it joins the previous block's group when ``x`` is the
        tensor that block read."""
        if self.traced:
            return
        if block not in self._seen:  # a block that runs again stays in its first group
            self._seen.add(block)
            last = self._last
            if last is not None and last[1] is x and self._trace[-1][-1] is last[0]:
                self._trace[-1].append(block)
            else:
                self._trace.append([block])
        self._last = (block, x)

    def end_trace(self) -> None:
        """The traced pass is over: no block joins a group any more; the groups of two or more
        blocks that can share the product are kept for :meth:`freeze`."""
        if self.traced:
            return
        self.traced = True
        self._eligible = [m for m in self._trace if _can_share(m)]
        self._trace, self._seen, self._last = [], set(), None

    def freeze(self) -> None:
        """Activate the traced groups."""
        if self.frozen:
            return
        self.end_trace()
        self.frozen = True
        for members in self._eligible:
            group = InputGroup(members)
            for index, member in enumerate(members):
                member.join_group(group, index)
            self.groups.append(group)
        if self.groups:
            logger.debug("ResLoRA: %d groups of blocks share one A product per input", len(self.groups))

    def set_structure(self, groups: list[list[ResLoRALayer]]) -> None:
        """Install known groups (from a checkpoint) instead of tracing them, active at once: a
        resumed run then computes what the run it continues computed after its first pass."""
        for group in self.groups:
            for member in group.members:
                member.join_group(None, 0)
        self.groups, self.frozen, self.traced, self._trace = [], False, False, list(map(list, groups))
        self.freeze()

    def new_pass(self) -> None:
        """Forget slices of an earlier pass (and the tracing pass's last input)."""
        self._last = None
        for group in self.groups:
            group.clear()

    def reset(self) -> None:
        """Drop an unfinished trace (a traced forward that raised)."""
        if not self.traced:
            self._trace, self._seen, self._last = [], set(), None

    def describe(self) -> list[list[str]]:
        """The groups' module paths (once traced, active or not)."""
        return [[m.module_path for m in members] for members in self._eligible]


def _can_share(members: list[ResLoRALayer]) -> bool:
    """Two or more blocks that may stack their rows: each reads only ``x`` and its folded inputs,
    and a folding type's members agree on ``c`` (the first member folds with its own)."""
    if len(members) < 2 or not all(b.can_share_input for b in members):
        return False
    return not members[0].shortcut.folds_input or len({float(b.shortcut_scale) for b in members}) == 1
