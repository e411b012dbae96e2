"""Chains: same-role ResLoRA blocks in forward-execution order, and their per-pass cache.

A chain is traced during the first forward pass after ResLoRA is attached: blocks join it
in the order they run, and the link ``n-1 -> n`` is kept only where the shortcut type's
:meth:`~.shortcuts.Shortcut.link_ok` allows it. The structure is then frozen. Within one
forward pass the chain caches what later blocks read (``x_n``, ``A_n x_n``: the type's
``caches``); the cache is emptied at the start and end of every pass of the root model, so
nothing from one step or one ``train()``/``eval()`` pass reaches the next.

A block talks to its chain through three calls per pass: :meth:`Chain.begin` (this block runs
now; returns the :class:`Step` with its linked predecessors), :meth:`Chain.record` (what it
computed, for the blocks after it) and :meth:`Chain.done` (its branch is computed). Once the
chain's last block is done, no block reads the cache again in this pass, and it is emptied in
place there, inside the forward: under ``torch.compile`` the root model's hooks run outside
the graph, and an activation still cached when the graph returned would have to be returned
as an extra graph output (kept alive through the step, a zero gradient made for it).

**Gradient checkpointing.** A checkpointed region runs its forward again in backward (non-
reentrant ``torch.utils.checkpoint``, which diffusers and transformers use), and backward walks
the original graph: an edge from block ``n-1``'s value into block ``n``'s shortcut keeps its
gradient, but the recomputation of block ``n`` must read the very value its first run read. A
*kept* pass (training under checkpointing, run eagerly) therefore keeps its cache until the
next pass begins, a block running again in it is a replay that reads the cache and changes
nothing, and it keeps only what the forward terms read (:attr:`~.shortcuts.Shortcut.kept_caches`,
rank-``r`` products where the type allows). With ``lookahead`` (``is`` on a traced chain) block
``n-1`` also computes block ``n``'s product ``A_n x_{n-1}``, so that what crosses the region
boundary is rank ``r`` instead of ``x_{n-1}``. Compiled, dynamo traces the checkpointed regions
into the graph, whose recomputation is functional: nothing is kept, and the lookahead still
keeps the values saved at region boundaries rank ``r``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .layers import ResLoRALayer
    from .shortcuts import Shortcut

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


@dataclass
class Step:
    """One block's run in the current pass: its position and its linked predecessors.

    ``pos`` is None for a block that did not run in the traced pass (it acts as plain LoRA).
    """

    chain: Chain
    pos: int | None
    #: positions of the linked predecessors, nearest first (at most ``chain.max_preds``)
    preds: list[int] = field(default_factory=list)
    #: the block runs again in a kept pass: gradient checkpointing recomputes it in backward
    #: (it reads the cache as its first run did and records nothing)
    replay: bool = False

    @property
    def pred_blocks(self) -> list[ResLoRALayer]:
        return [self.chain.blocks[p] for p in self.preds]


class Chain:
    """Blocks of one role in execution order, the links between them, and the pass cache."""

    def __init__(self, name: str, shortcut: Shortcut) -> None:
        self.name = name
        self.shortcut = shortcut
        #: most predecessors one block reads (the type's, for the configured ``pre_num``)
        self.max_preds = shortcut.max_preds
        self.blocks: list[ResLoRALayer] = []
        # links[i]: the shortcut block i-1 -> block i is allowed (links[0] is always False).
        self.links: list[bool | None] = []
        self.frozen = False
        self._positions: dict[ResLoRALayer, int] = {}
        self._preds: list[list[int]] = []
        self._succs: list[list[int]] = []
        self.new_pass()

    # -- per-pass cache ---------------------------------------------------------------
    def new_pass(self, checkpointed: bool = False, compiled: bool = False, ahead_ok: bool = True) -> None:
        """Forget everything cached in the current forward pass and start another.

        ``checkpointed``: a training pass under gradient checkpointing. Run eagerly, its cache
        is kept for the recomputation in backward (module doc); compiled, the recomputation is
        part of the graph and reads no cache. On a traced chain of a type that looks ahead, and
        with ``ahead_ok`` (no LoRA dropout, whose masks are drawn per block), blocks also
        compute their successors' products (:meth:`ahead_blocks`), cached as ``"ahead"``.
        """
        n = len(self.blocks)
        #: a training pass under gradient checkpointing: blocks must run with autograd
        self.checkpointed = checkpointed
        #: this pass keeps its cache for a recomputation in backward
        self.keep = checkpointed and not compiled
        #: blocks compute their successors' shortcut products in this pass
        self.lookahead = checkpointed and ahead_ok and self.frozen and self.shortcut.looks_ahead
        if self.lookahead:
            kinds: tuple[str, ...] = ("ahead",)
        else:
            kinds = self.shortcut.pass_caches(self.keep)
        self._ran = [False] * n
        self._cache: dict[str, list[torch.Tensor | None]] = {k: [None] * n for k in kinds}

    def cached(self, kind: str, pos: int) -> torch.Tensor | None:
        """What block ``pos`` recorded in this pass (None: nothing of that kind, or not this pass)."""
        cache = self._cache.get(kind)
        return None if cache is None else cache[pos]

    # -- one block's run --------------------------------------------------------------
    def begin(self, block: ResLoRALayer, x: torch.Tensor) -> Step:
        """``block`` runs now on input ``x``: trace it (first pass) and return its step."""
        pos = self._positions.get(block)
        if self.checkpointed and not torch.is_grad_enabled():
            raise ValueError(_REENTRANT)
        if not self.frozen:
            if pos is None:
                pos = self._append(block)
                if pos > 0:
                    self.links[pos] = bool(self.shortcut.link_ok(Step(self, pos), block, x))
            elif self._ran[pos]:
                # The block runs a second time without the root model's hooks in between:
                # the traced pass is complete (a submodule called directly).
                self.freeze()
                self.new_pass(self.checkpointed, not self.keep)
        elif pos is None:
            return Step(self, None)
        elif self.keep and self._ran[pos]:
            return Step(self, pos, self.preds(pos), replay=True)
        elif self._ran[pos]:
            self.new_pass()
        self._ran[pos] = True
        return Step(self, pos, self.preds(pos))

    def record(self, step: Step, **activations: torch.Tensor | None) -> None:
        """Keep this pass's activations of ``step``'s block that later blocks read (the kinds
        this pass caches; a replay records nothing)."""
        if step.pos is None or step.replay:
            return
        for kind, cache in self._cache.items():
            cache[step.pos] = activations.get(kind)

    def done(self, step: Step) -> None:
        """``step``'s block has computed its branch; after the chain's last block the cache is
        emptied in place (rebinding it would leave the old lists, still holding this pass's
        tensors, to a compiled graph's outputs). A kept pass keeps it for the recomputation."""
        if step.pos is None or self.keep or not self.frozen or step.pos != len(self.blocks) - 1:
            return
        for cache in self._cache.values():
            for pos in range(len(cache)):
                cache[pos] = None

    # -- structure --------------------------------------------------------------------
    def position(self, block: ResLoRALayer) -> int | None:
        """The block's position in the traced order (None: it did not run when traced)."""
        return self._positions.get(block)

    def preds(self, pos: int) -> list[int]:
        """Positions of the linked predecessors of ``pos``, nearest first (at most ``max_preds``)."""
        if self.frozen:
            return self._preds[pos]
        return self._walk_back(pos)

    def ahead_blocks(self, block: ResLoRALayer) -> list[ResLoRALayer]:
        """In a lookahead pass, the blocks whose shortcut products ``block`` computes: those that
        read it (nearest first); none in other passes."""
        pos = self._positions.get(block)
        if not self.lookahead or pos is None:
            return []
        return [self.blocks[s] for s in self._succs[pos]]

    def _walk_back(self, pos: int) -> list[int]:
        out = []
        while len(out) < self.max_preds and pos > 0 and self.links[pos]:
            pos -= 1
            out.append(pos)
        return out

    def _append(self, block: ResLoRALayer) -> int:
        pos = len(self.blocks)
        self._positions[block] = pos
        self.blocks.append(block)
        self.links.append(False)
        self._ran.append(False)
        for cache in self._cache.values():
            cache.append(None)
        return pos

    def reset_trace(self) -> None:
        """Drop an unfinished trace (a traced forward that raised)."""
        self.blocks, self.links, self._preds, self._succs, self._positions = [], [], [], [], {}
        self.new_pass()

    def freeze(self) -> None:
        self._preds = [self._walk_back(pos) for pos in range(len(self.blocks))]
        self._succs = [[] for _ in self.blocks]
        for pos, preds in enumerate(self._preds):
            for p in preds:
                self._succs[p].append(pos)
        self.frozen = True

    def set_structure(self, blocks: list[ResLoRALayer], links: list[bool]) -> None:
        """Install a known structure (from a checkpoint) instead of tracing it."""
        self.reset_trace()
        for block, link in zip(blocks, links):
            pos = self._append(block)
            self.links[pos] = bool(link) and pos > 0
        self.freeze()
        self.new_pass()

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


_REENTRANT = (
    "ResLoRA: a block ran without autograd inside a training pass with gradient checkpointing: "
    "reentrant checkpointing (use_reentrant=True) would lose the gradients through the shortcuts. "
    "Enable checkpointing with use_reentrant=False (diffusers' enable_gradient_checkpointing() does; "
    "transformers: gradient_checkpointing_kwargs={'use_reentrant': False})"
)


def log_structure(chains: dict[str, Chain], unreached: list[str]) -> None:
    """One INFO line for the traced chains (each chain's segments at DEBUG: a UNet has a dozen
    chains, and ``chain_structure(model)`` returns them as data), a WARNING for blocks the
    traced pass never reached."""
    segments = 0
    for name, chain in chains.items():
        sizes = [len(s) for s in chain.segments()]
        segments += len(sizes)
        logger.debug(
            "ResLoRA chain %s: %d blocks in %d segments %s", name, len(chain.blocks), len(sizes), sizes
        )
    blocks = sum(len(chain.blocks) for chain in chains.values())
    logger.info("ResLoRA: traced %d chains, %d blocks in %d segments", len(chains), blocks, segments)
    if unreached:
        logger.warning(
            "ResLoRA: %d adapted modules did not run in the traced forward and act as plain LoRA: %s",
            len(unreached),
            ", ".join(unreached[:5]) + (" ..." if len(unreached) > 5 else ""),
        )
