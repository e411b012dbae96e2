"""ResLoRA layers: one base that owns the branch, the chain calls and the statistics, and
one small class per kind of frozen layer that says how ``A`` and ``B`` apply to it.

========================  ===========================  ==========================================
kind                      ``lora_A`` / ``lora_B``      ``A x`` / ``B mid``
========================  ===========================  ==========================================
``nn.Linear``             ``(r, in)`` / ``(out, r)``   ``x A^T`` / ``mid B^T``
transformers ``Conv1D``   same (weight stored          same
                          ``(in, out)``)
``nn.Conv2d`` (LoCon)     ``(r, in, kh, kw)`` /        ``A`` a convolution with the base layer's
                          ``(out, r, 1, 1)``           kernel, stride and padding; ``B`` 1 x 1
========================  ===========================  ==========================================

The factor shapes are PEFT's, so a merged ``(A', B')`` is a PEFT/diffusers LoRA as it is.
A new layer kind is one subclass of :class:`ResLoRALayer` and one :func:`register_layer`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .chain import Chain, Step
from .config import ResLoRAConfig
from .fusion import InputGroup, InputGroups

Observer = Callable[["ResLoRALayer", torch.Tensor, Step], None]


class ObserverHandle:
    """Returned by :meth:`ResLoRALayer.add_observer`; ``remove()`` detaches the observer."""

    def __init__(self, observers: dict, key: int) -> None:
        self._observers, self._key = observers, key

    def remove(self) -> None:
        self._observers.pop(self._key, None)


def as_factor_input(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype of the (float32) factor ``a``, except under autocast.

    A frozen half-precision base gives half-precision activations; without autocast ``A x``
    runs in ``a``'s dtype. Under autocast the product's dtype is autocast's choice: casting
    ``x`` up here would be cast back down by autocast, a round trip of the activation on
    every call, while autocast casts the leaf factors once per forward (its weight cache).
    """
    if torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(a.dtype)


class ResLoRALayer(nn.Module, ABC):
    """``h_n = base(x_n) + s * B_stack(mid_n)``, the shortcut term chosen by ``res_type``.

    Attributes:
        base_layer: the original (frozen) module.
        lora_A, lora_B: the branch factors (shapes per layer kind, see the module doc);
            ``A`` kaiming-uniform (or gaussian) and ``B`` zero at init.
        scaling: ``s = alpha / r``.
        shortcut: the :class:`~.shortcuts.Shortcut` of the configured ``res_type``.
        chain: the :class:`~.chain.Chain` of blocks with the same role.
        module_path: the adapted module's path in the model ResLoRA was attached to.
        norm_window, norm_count: sliding window of RMS norms of ``x`` (or ``A x``: the type's
            ``stat``), recorded in training mode for the input merge when ``record_norms``.
            The write position is ``norm_count`` itself, so loading a state dict resumes the
            window where it was.
        record_norms: the config's ``records_norms``: whether training passes record the window.
        inputs: the model's :class:`~.fusion.InputGroups`; ``group`` is this block's group of
            blocks reading the same input (None: it applies its ``A`` alone).
        shortcut_scale: the factor ``c`` on every shortcut term of this block (0-dim buffer,
            1 by default; :func:`~.inject.set_shortcut_scale`). A tensor, not a Python float,
            so that a schedule changing it every step does not make ``torch.compile`` recompile;
            at ``c = 0`` the block is a plain LoRA. ``is`` blocks of one shared-input group fold
            with the first member's ``c`` (the group forms only where they are equal).
    """

    #: the dimension of ``x`` and ``A x`` that holds features (channels)
    feature_dim: int = -1
    #: blocks of this kind may stack their ``A`` rows with others reading the same input
    #: (a layer kind whose ``A`` product depends on more than its rows, a convolution's
    #: geometry, says no)
    stacks_rows: bool = True
    #: the base weight is stored ``(in, out)`` (transformers' ``Conv1D``): PEFT's ``LoraConfig``
    #: must say so in ``fan_in_fan_out`` for the exported factors to apply
    fan_in_fan_out: bool = False

    def __init__(
        self,
        base_layer: nn.Module,
        config: ResLoRAConfig,
        module_path: str,
        chain: Chain,
        inputs: InputGroups | None = None,
    ) -> None:
        super().__init__()
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        a_shape, b_shape = self.factor_shapes(base_layer, config.rank)
        self.base_layer = base_layer
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=weight.device))
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.shortcut = chain.shortcut
        self.chain = chain
        self.module_path = module_path
        self.register_buffer("norm_window", torch.zeros(config.norm_window, device=weight.device))
        self.register_buffer("norm_count", torch.zeros((), dtype=torch.long, device=weight.device))
        self.register_buffer("shortcut_scale", torch.ones((), device=weight.device))
        self.record_norms = config.records_norms
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._observers: dict[int, Observer] = {}
        self._next_observer = 0
        self.inputs = inputs if inputs is not None else InputGroups()
        self.group: InputGroup | None = None
        self._group_index = 0
        self.reset_parameters(config.init)

    # -- what a layer kind defines ----------------------------------------------------
    @classmethod
    @abstractmethod
    def handles(cls, module: nn.Module) -> bool:
        """Whether this class adapts ``module``."""

    @staticmethod
    @abstractmethod
    def factor_shapes(base_layer: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of ``lora_A`` and ``lora_B`` for ``base_layer``."""

    def apply_a(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``A x`` for (stacked) A rows ``a``, in ``a``'s dtype (under autocast: autocast's)."""
        return F.linear(as_factor_input(x, a), a)

    def apply_b(self, mid: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``B mid`` for (stacked) B columns ``b``."""
        return F.linear(mid, b)

    def ax_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """The shape of ``A_n x`` for input ``x`` (without computing it)."""
        return (*x.shape[:-1], self.rank)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a matrix whose rows ``v`` give the rows of ``A x`` as ``A_matrix v``."""
        return x.reshape(-1, x.shape[-1])

    def ax_rows(self, ax: torch.Tensor) -> torch.Tensor:
        """``A x`` as a ``(vectors, r)`` matrix matching :meth:`rows`."""
        return ax.reshape(-1, ax.shape[-1])

    def base_weight(self) -> torch.Tensor:
        """The frozen weight in the layout of ``B @ A`` (``(out, in)`` for linear layers)."""
        return self.base_layer.weight

    # -- shared behaviour ---------------------------------------------------------------
    def reset_parameters(self, init: str = "kaiming") -> None:
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.rank)
            nn.init.zeros_(self.lora_B)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen layer's own weight, as stored: models that read ``layer.weight`` (T5 casts
        its feed-forward input to ``wo.weight.dtype``) see the layer they were built with."""
        return self.base_layer.weight

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out + self.delta(x).to(out.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The branch ``s * B_stack(mid_n)`` for input ``x`` (base output excluded).

        In a shared-input group (:mod:`.fusion`) the first block computes every member's
        ``A x`` in one product and a later member takes its slice.
        """
        step, a = self.start(x)
        if not self.inputs.traced:  # only the first pass traces the groups
            self.inputs.observe(self, x)
        reads = (x, *self.folded_inputs(step)) if self.group is not None else ()
        ax = self.group.take(self._group_index, reads) if self._group_index else None
        if ax is None:
            xin = self.branch_input(step, self.dropout(x))
            if self.group is not None and self._group_index == 0:
                ax = self.group.apply_a(xin, a, reads)
            else:
                ax = self.apply_a(xin, a)
        return self.finish(step, x, ax)

    def start(self, x: torch.Tensor) -> tuple[Step, torch.Tensor]:
        """Begin this block's run: its chain step and the A rows to apply to :meth:`branch_input`
        (``ax = apply_a(branch_input(step, dropout(x)), a)``, or this block's slice of its
        shared-input group's product), then :meth:`finish` completes it."""
        step = self.chain.begin(self, x)
        if self._factors is not None:
            return step, self._factors[0]
        return step, self.shortcut.a_weight(self, step.pred_blocks)

    def a_rows(self) -> torch.Tensor:
        """The ``A`` rows this block applies in the current structure (what :meth:`start`
        returns), without beginning a run: a shared-input group's first block stacks them."""
        if self._factors is not None:
            return self._factors[0]
        pos = self.chain.position(self)
        preds = [] if pos is None else [self.chain.blocks[p] for p in self.chain.preds(pos)]
        return self.shortcut.a_weight(self, preds)

    @property
    def can_share_input(self) -> bool:
        """Whether this block's ``A`` product reads only ``x`` and the activations its shortcut
        folds in (:meth:`folded_inputs`), so that it may be stacked with other blocks reading
        the same ones (no LoRA dropout, which draws a mask per block)."""
        return self.stacks_rows and isinstance(self.dropout, nn.Identity)

    def join_group(self, group: InputGroup | None, index: int) -> None:
        """Become member ``index`` of a shared-input group (set when the groups are traced;
        None: apply ``A`` alone)."""
        self.group, self._group_index = group, index

    def folded_inputs(self, step: Step) -> tuple[torch.Tensor | None, ...]:
        """The earlier activations :meth:`branch_input` folds in this run (none for a merged
        stand-in, which reads ``xd`` alone)."""
        if self._factors is not None:
            return ()
        return self.shortcut.folded_inputs(self, step)

    def branch_input(self, step: Step, xd: torch.Tensor) -> torch.Tensor:
        """What this run's ``A`` product reads, from ``xd = dropout(x_n)``: ``xd`` itself, or
        the shortcut type's fold of earlier inputs into it (``is``: ``xd + c dropout(x_{n-1})``,
        one ``A`` product instead of two). A merged stand-in reads ``xd``."""
        if self._factors is not None:
            return xd
        return self.shortcut.a_input(self, step, xd)

    def finish(self, step: Step, x: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
        """Complete the branch from ``ax`` (see :meth:`start`): cache, record, observe, apply B."""
        sc = self.shortcut
        if self._factors is not None:  # a merged plain LoRA stands in for the branch
            self.chain.record(step, x=x, ax=ax)
            self._notify(x, step)
            self.chain.done(step)
            return self.apply_b(ax, self._factors[1])
        own_ax = sc.own_ax(self, ax)
        self.chain.record(step, x=x, ax=own_ax, ahead=sc.ahead_ax(self, ax))
        if self.training and self.record_norms and sc.stat is not None and not step.replay:
            self._record_norm(x if sc.stat == "x" else own_ax)
        if not step.replay:
            self._notify(x, step)
        mid = sc.mid(self, step, x, ax)
        self.chain.done(step)
        if self.scaling != 1.0:
            mid = mid * self.scaling
        return self.apply_b(mid, sc.b_weight(self, step.pred_blocks))

    # -- interface for merges ---------------------------------------------------------
    def use_factors(self, factors: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Compute ``W x + B' (A' x)`` from plain-LoRA factors instead of the branch (None: back)."""
        self._factors = factors

    @property
    def uses_factors(self) -> bool:
        return self._factors is not None

    def add_observer(self, observer: Observer) -> ObserverHandle:
        """Call ``observer(block, x, step)`` on every run, after this pass's cache is filled."""
        key = self._next_observer
        self._next_observer += 1
        self._observers[key] = observer
        return ObserverHandle(self._observers, key)

    def _notify(self, x: torch.Tensor, step: Step) -> None:
        for observer in list(self._observers.values()):
            observer(self, x, step)

    def a_matrix(self, a: torch.Tensor | None = None) -> torch.Tensor:
        """``A`` (or ``a``) as an ``(r, in_flat)`` matrix acting on :meth:`rows`."""
        a = self.lora_A if a is None else a
        return a.reshape(a.shape[0], -1)

    def delta_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``B @ A`` in the layout of :meth:`base_weight`."""
        return (b.reshape(b.shape[0], -1) @ self.a_matrix(a)).reshape(self.base_weight().shape)

    # -- statistics -------------------------------------------------------------------
    @torch.no_grad()
    def _record_norm(self, t: torch.Tensor) -> None:
        """Record ``||t||_F / sqrt(#vectors)``: the RMS feature-vector norm, independent of batch size.

        The position is computed on the device from ``norm_count`` (no host sync, and a
        loaded ``norm_count`` continues the window).
        """
        t = t.detach()
        vectors = max(1, t.numel() // t.shape[self.feature_dim])
        value = torch.linalg.vector_norm(t.float()) / math.sqrt(vectors)
        index = torch.remainder(self.norm_count, self.norm_window.numel()).view(1)
        self.norm_window.index_copy_(0, index, value.view(1).to(self.norm_window.dtype))
        self.norm_count.add_(1)

    def window_mean(self) -> torch.Tensor | None:
        """Mean of the recorded norms (``f_n``), or None when nothing was recorded."""
        n = min(int(self.norm_count), self.norm_window.numel())
        return self.norm_window[:n].double().mean() if n else None

    def extra_repr(self) -> str:
        return (
            f"{self.module_path}: A={tuple(self.lora_A.shape)}, B={tuple(self.lora_B.shape)}, "
            f"scaling={self.scaling:g}, res_type={self.shortcut.name}"
        )


_LAYER_KINDS: list[type[ResLoRALayer]] = []


def register_layer(cls: type[ResLoRALayer]) -> type[ResLoRALayer]:
    """Make ResLoRA adapt the modules ``cls.handles``; usable as a decorator."""
    _LAYER_KINDS.append(cls)
    return cls


def layer_class_for(module: nn.Module) -> type[ResLoRALayer] | None:
    """The ResLoRA layer class that adapts ``module``, or None."""
    return next((cls for cls in _LAYER_KINDS if cls.handles(module)), None)


@register_layer
class ResLoRALinear(ResLoRALayer):
    """``nn.Linear``: ``A`` is ``(r, in)``, ``B`` is ``(out, r)``."""

    @classmethod
    def handles(cls, module):
        return isinstance(module, nn.Linear)

    @staticmethod
    def factor_shapes(base_layer, rank):
        return (rank, base_layer.in_features), (base_layer.out_features, rank)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer with weight stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@register_layer
class ResLoRAConv1D(ResLoRALinear):
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``.

    PEFT exports it with ``fan_in_fan_out=True``.
    """

    fan_in_fan_out = True

    @classmethod
    def handles(cls, module):
        return is_conv1d(module)

    @staticmethod
    def factor_shapes(base_layer, rank):
        in_f, out_f = base_layer.weight.shape
        return (rank, in_f), (out_f, rank)

    def base_weight(self):
        return self.base_layer.weight.t()


@register_layer
class ResLoRAConv2d(ResLoRALayer):
    """``nn.Conv2d`` as LoCon: ``A`` a convolution with the base kernel, stride and padding
    (``(r, in, kh, kw)``), ``B`` a 1 x 1 convolution (``(out, r, 1, 1)``).

    The calibrated merges see ``A`` as an ``(r, in kh kw)`` matrix acting on unfolded patches.
    """

    feature_dim = 1
    stacks_rows = False

    @classmethod
    def handles(cls, module):
        return isinstance(module, nn.Conv2d)

    @staticmethod
    def factor_shapes(base_layer, rank):
        if base_layer.groups != 1 or tuple(base_layer.dilation) != (1, 1):
            raise ValueError(
                f"ResLoRA adapts Conv2d layers with groups=1 and dilation 1, not groups="
                f"{base_layer.groups}, dilation={tuple(base_layer.dilation)}"
            )
        if base_layer.padding_mode != "zeros" or isinstance(base_layer.padding, str):
            raise ValueError("ResLoRA adapts Conv2d layers with numeric zero padding only")
        kh, kw = base_layer.kernel_size
        return (rank, base_layer.in_channels, kh, kw), (base_layer.out_channels, rank, 1, 1)

    def apply_a(self, x, a):
        conv = self.base_layer
        return F.conv2d(as_factor_input(x, a), a, stride=conv.stride, padding=conv.padding)

    def apply_b(self, mid, b):
        return F.conv2d(mid, b)

    def ax_shape(self, x):
        conv = self.base_layer
        size = [
            (n + 2 * p - k) // s + 1
            for n, p, k, s in zip(x.shape[-2:], conv.padding, conv.kernel_size, conv.stride)
        ]
        return (*x.shape[:-3], self.rank, *size)

    def rows(self, x):
        conv = self.base_layer
        patches = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def ax_rows(self, ax):
        return ax.movedim(1, -1).reshape(-1, ax.shape[1])
