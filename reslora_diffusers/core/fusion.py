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
caller that breaks the pattern costs time, never correctness. Groups form only where the
product reads ``x`` itself: without LoRA dropout (each block draws its own mask, as PEFT does)
and for shortcut types that do not fold earlier inputs into ``A``'s input (``is``).
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
        self._input: torch.Tensor | None = None
        self._pending: list[torch.Tensor | None] = [None] * len(members)

    def apply_a(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The first member's ``A x`` (its rows ``a``), computing the later members' in the same
        product and keeping them for :meth:`take`."""
        rows = [a] + [m.a_rows() for m in self.members[1:]]
        ax = self.members[0].apply_a(x, torch.cat(rows, dim=0))
        parts = ax.split([r.shape[0] for r in rows], dim=self.members[0].feature_dim)
        self._input, self._pending = x, [None, *parts[1:]]
        return parts[0]

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member ``index``'s ``A x`` when the first member computed it for this very ``x``."""
        ax, self._pending[index] = self._pending[index], None
        shared = ax is not None and x is self._input
        if index == len(self.members) - 1:
            # the last slice is taken: forget the input here, in the forward (see Chain.done)
            self._input = None
        return ax if shared else None

    def clear(self) -> None:
        self._input, self._pending = None, [None] * len(self.members)


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
        self._eligible = [m for m in self._trace if len(m) > 1 and all(b.can_share_input for b in m)]
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
            logger.info("ResLoRA: %d groups of blocks share one A product per input", len(self.groups))

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
