"""The shortcut contract: everything a ResLoRA shortcut type decides, in one class.

Every block computes ``delta_n = s * B_stack (mid_n)`` where ``mid_n`` is built from
``ax_n = A_stack x_n``. Every shortcut term (what a type adds beyond the plain ``B_n A_n x_n``)
is multiplied by the block's ``shortcut_scale`` ``c``: at ``c = 0`` each type is a plain LoRA,
and the merges see ``c`` in their terms (``coeff``) and scalars. A type says:

* ``a_weight`` / ``b_weight``: the stacked factors it applies (``A_n``/``B_n`` unless it
  stacks earlier blocks' factors, as ``bs`` does);
* ``caches``: which activations of this pass later blocks read (``"x"``, ``"ax"``), and
  ``kept_caches``/``looks_ahead``: what a pass under gradient checkpointing keeps for the
  recomputation in backward (:mod:`..chain`);
* ``link_ok``: whether block ``n-1`` may feed block ``n`` (decided once, while tracing);
* ``a_input`` and ``mid``: the forward terms, before and after the ``A`` product;
* ``stat``: what its norm window records for the input merge (``"x"``, ``"ax"`` or None);
* ``exact_merge`` and ``merged_factors``: how it becomes a plain LoRA;
* ``calibration_terms``: what the calibrated merges fit.

Nothing outside this package compares ``res_type`` names; a new type is one subclass and
one :func:`~reslora_diffusers.core.shortcuts.register_shortcut` call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from reslora_diffusers.core.chain import Step
    from reslora_diffusers.core.layers import ResLoRALayer

Factors = tuple[torch.Tensor, torch.Tensor]


class MergeContext(Protocol):
    """What a merge offers the shortcut types (implemented in :mod:`reslora_diffusers.merge`)."""

    #: the merge fits ``A'_n = A_n + G_n`` on calibration batches (``calibrated``, ``sequential``)
    calibrated: bool
    #: ``input`` or ``weight`` for the paper's scalar merges
    method: str

    def window_mean(self, block: ResLoRALayer) -> float:
        """``f_n``: mean of the block's norm window."""

    def weight_ratio(self, block: ResLoRALayer, lag: int) -> float:
        """``f*_{n-lag-1} / f*_{n-1}`` of the already merged weights (1 where missing)."""

    def correction(self, block: ResLoRALayer) -> torch.Tensor:
        """The calibrated ``G_n`` of the block, shaped like ``A_n``."""

    def record_alpha(self, block: ResLoRALayer, alpha: float) -> None:
        """Report the scalar ``alpha*`` a merge used."""


@dataclass
class CalibrationTerm:
    """One shortcut term of block n as the calibrated merge sees it: ``coeff * A_src x_src``.

    ``source`` is the block whose ``A`` (and convolution geometry) reads ``x_src``, an input
    of an earlier block of the same pass.
    """

    source: ResLoRALayer
    x_src: torch.Tensor
    coeff: float = 1.0


class Shortcut:
    """Plain LoRA (``res_type="none"``): no shortcut; also the base of the other types."""

    name: ClassVar[str] = "none"
    #: per-block statistic the norm window records for the input merge ("x", "ax" or None)
    stat: ClassVar[str | None] = None
    #: activations of the current pass that later blocks read
    caches: ClassVar[tuple[str, ...]] = ()
    #: what a pass under gradient checkpointing keeps until backward has recomputed its blocks:
    #: the caches the forward terms read (the rest serve merges, which never checkpoint);
    #: None: all of ``caches``
    kept_caches: ClassVar[tuple[str, ...] | None] = None
    #: under gradient checkpointing, on a traced chain, block ``n-1`` computes block ``n``'s
    #: shortcut product from its own input (cached as ``"ahead"``; :meth:`ahead_ax`)
    looks_ahead: ClassVar[bool] = False
    #: the type merges into a plain LoRA exactly (no calibration, no approximation)
    exact_merge: ClassVar[bool] = True
    #: ``pre_num`` changes what the type computes (shown in reports and model cards)
    uses_pre_num: ClassVar[bool] = False
    #: ``a_input`` folds earlier inputs into the ``A`` product's input (it is not ``x_n`` alone),
    #: scaled by each block's ``c``
    folds_input: ClassVar[bool] = False

    def __init__(self, pre_num: int) -> None:
        self.pre_num = pre_num

    @property
    def max_preds(self) -> int:
        """How many earlier blocks of the chain feed one block at most."""
        return 0

    @property
    def plain(self) -> bool:
        """The type computes a plain LoRA (``none``; ``bs``/``ms`` with ``pre_num`` 0): no
        block reads another, so there is nothing to merge."""
        return self.max_preds == 0

    @property
    def label(self) -> str:
        """How logs, model cards and the demo name the method: ``LoRA`` for a plain type,
        ``ResLoRA <name>`` otherwise."""
        return "LoRA" if self.plain else f"ResLoRA {self.name}"

    @property
    def title(self) -> str:
        """``ResLoRA <name>``, with `` m=<pre_num>`` where ``pre_num`` changes what the type
        computes: how benchmark tables and the demo tell variants apart."""
        return f"ResLoRA {self.name}" + (f" m={self.pre_num}" if self.uses_pre_num else "")

    @property
    def reads_activations(self) -> bool:
        """Blocks read activations cached earlier in the same pass (which a pass under
        gradient checkpointing keeps for the recomputation in backward)."""
        return bool(self.caches)

    def pass_caches(self, kept: bool) -> tuple[str, ...]:
        """What a pass caches: ``caches``, or ``kept_caches`` in a pass kept for gradient
        checkpointing's recomputation."""
        return self.kept_caches if kept and self.kept_caches is not None else self.caches

    def link_ok(self, step: Step, block: ResLoRALayer, x: torch.Tensor) -> bool:
        """May the block before ``block`` in the chain feed it? (``step.chain`` has its cache.)"""
        return False

    def a_weight(self, block: ResLoRALayer, preds: list[ResLoRALayer]) -> torch.Tensor:
        return block.lora_A

    def b_weight(self, block: ResLoRALayer, preds: list[ResLoRALayer]) -> torch.Tensor:
        return block.lora_B

    def a_input(self, block: ResLoRALayer, step: Step, xd: torch.Tensor) -> torch.Tensor:
        """What ``A_stack`` applies to, from ``xd = dropout(x_n)`` (a type whose shortcut is
        linear in ``A`` folds it in here, so that the product runs once)."""
        return xd

    def folded_inputs(self, block: ResLoRALayer, step: Step) -> tuple[torch.Tensor | None, ...]:
        """The earlier activations :meth:`a_input` folds into ``xd`` in this run (none: it reads
        ``xd`` alone). Blocks with the same ``x``, the same folded tensors and equal scale ``c``
        give ``A`` the same input, so a shared-input group may stack their rows (:mod:`..fusion`)."""
        return ()

    def mid(self, block: ResLoRALayer, step: Step, x: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
        """The intermediate ``mid_n`` from ``ax = A_stack x`` and this pass's cache."""
        return ax

    def own_ax(self, block: ResLoRALayer, ax: torch.Tensor) -> torch.Tensor:
        """``A_n x_n`` out of ``ax = A_stack x_n`` (what later blocks and the norm window read)."""
        return ax

    def ahead_ax(self, block: ResLoRALayer, ax: torch.Tensor) -> torch.Tensor | None:
        """The successors' products out of ``ax`` in a lookahead pass (None: there are none)."""
        return None

    def merged_factors(self, block: ResLoRALayer, preds: list[ResLoRALayer], ctx: MergeContext) -> Factors:
        """``(A', B')`` of the plain LoRA, scaling baked into ``B'`` (``dW = B' A'``)."""
        return block.lora_A.detach(), block.lora_B.detach() * block.scaling

    def calibration_terms(self, block: ResLoRALayer, step: Step) -> list[CalibrationTerm]:
        """The shortcut's terms ``z_k`` of block n in this pass, one per predecessor."""
        return []


class ActivationShortcut(Shortcut, ABC):
    """Shortcuts that read earlier activations (``is``, ``ms``). They merge approximately:
    by a scalar ``alpha`` (``dW_n = s (1 + c alpha) B_n A_n``, paper) or by the calibrated map
    ``A'_n = A_n + G_n`` fitted on :meth:`calibration_terms`."""

    exact_merge = False

    @abstractmethod
    def input_alpha(self, block: ResLoRALayer, preds: list[ResLoRALayer], ctx: MergeContext) -> float:
        """``alpha`` of the input merge, from the norm windows."""

    @abstractmethod
    def weight_alpha(self, block: ResLoRALayer, preds: list[ResLoRALayer], ctx: MergeContext) -> float:
        """``alpha`` of the weight merge, from the merged weights' norms."""

    def merged_factors(self, block, preds, ctx):
        A, B = block.lora_A.detach(), block.lora_B.detach() * block.scaling
        if not preds:
            return A, B
        if ctx.calibrated:
            return A + ctx.correction(block), B
        if ctx.method == "input":
            alpha = self.input_alpha(block, preds, ctx)
        else:
            alpha = self.weight_alpha(block, preds, ctx)
        # the shortcut term is c * alpha * A_n x_n under the scalar assumption
        alpha = float(block.shortcut_scale) * alpha
        ctx.record_alpha(block, alpha)
        return A, B * (1 + alpha)


def check_cached(block: ResLoRALayer, pred: ResLoRALayer, cached, current: torch.Tensor) -> torch.Tensor:
    """The cached activation of ``pred``, checked against what this pass computes."""
    if cached is None:
        raise RuntimeError(
            f"ResLoRA: {block.module_path} needs {pred.module_path} from the same forward pass, "
            "but that block has not run in this pass (a block called on its own, outside the "
            "model's forward, with the model in training mode under gradient checkpointing?)"
        )
    if cached.shape != current.shape:
        raise ValueError(
            f"ResLoRA: shortcut {pred.module_path} -> {block.module_path} was traced with equal shapes "
            f"but now sees {tuple(cached.shape)} vs {tuple(current.shape)}"
        )
    return cached
