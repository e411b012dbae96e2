"""The ResLoRA block: a frozen linear layer plus its low-rank branch and chain shortcut."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .chain import Chain
from .config import ResLoRAConfig
from .shortcuts import SHORTCUTS


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"ResLoRA adapts nn.Linear and transformers Conv1D, not {type(module).__name__}")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer with weight stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class ResLoRALinear(nn.Module):
    """``h_n = base(x_n) + s * B_stack(mid_n)``, the shortcut term chosen by ``res_type``.

    Attributes:
        base_layer: the original (frozen) linear module.
        lora_A: ``(r, in)`` parameter, kaiming-uniform (or gaussian) at init.
        lora_B: ``(out, r)`` parameter, zero at init.
        scaling: ``alpha / r``.
        module_path: the adapted module's path in the model passed to ``add_reslora``.
        norm_window, norm_count: sliding window of RMS norms of ``x`` (is) or ``A x`` (ms),
            recorded in training mode for the input merge.
    """

    def __init__(self, base_layer: nn.Module, config: ResLoRAConfig, module_path: str, chain: Chain) -> None:
        super().__init__()
        in_f, out_f = linear_dims(base_layer)
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.base_layer = base_layer
        self.lora_A = nn.Parameter(torch.empty(config.rank, in_f, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_f, config.rank, dtype=dtype, device=weight.device))
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.shortcut = SHORTCUTS[config.res_type](config.pre_num)
        self.module_path = module_path
        self.register_buffer("norm_window", torch.zeros(config.norm_window, device=weight.device))
        self.register_buffer("norm_count", torch.zeros((), dtype=torch.long, device=weight.device))
        self._norm_n = 0
        self._chain = chain
        self._pos: int | None = None
        self._merged: tuple[torch.Tensor, torch.Tensor] | None = None
        self._calib = None
        self.reset_parameters(config.init)

    def reset_parameters(self, init: str = "kaiming") -> None:
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.lora_A.shape[0])
            nn.init.zeros_(self.lora_B)

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as ``(out, in)``."""
        w = self.base_layer.weight
        return w.t() if is_conv1d(self.base_layer) else w

    # -- forward ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out + self.delta(x).to(out.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The branch term ``s * B_stack(mid_n)`` for input ``x`` (base output excluded)."""
        a = self.a_weight()
        return self.finish(x, F.linear(self.dropout(x.to(a.dtype)), a))

    def a_weight(self) -> torch.Tensor:
        """Register this block's run in its chain and return the A rows it applies to ``x``.

        Callers that fuse several blocks' A projections (the attention processor) call this,
        compute ``ax = dropout(x) @ a_weight().T`` themselves, and hand ``ax`` to :meth:`finish`.
        """
        chain = self._chain
        self._run_pos = pos = chain.enter(self)
        if pos is not None and not chain.frozen and self.shortcut.name == "bs" and pos > 0:
            chain.decide_link(pos, self.shortcut.link_ok(chain.blocks[pos - 1], self, None, None))
        return self.shortcut.a_weight(self, self._pred_blocks(pos, for_a=True))

    def finish(self, x: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
        """Complete the branch from ``ax = dropout(x) @ a_weight().T`` (see :meth:`a_weight`)."""
        chain, pos, sc = self._chain, self._run_pos, self.shortcut
        own_ax = ax[..., : self.lora_A.shape[0]] if sc.name == "bs" else ax
        if pos is not None:
            if not chain.frozen and pos > 0 and chain.links[pos] is None:
                chain.decide_link(pos, sc.link_ok(chain.blocks[pos - 1], self, x, own_ax))
            if sc.stat is not None:
                chain.xs[pos] = x
                chain.axs[pos] = own_ax
        pred_pos = chain.preds(pos) if pos is not None else []
        preds = [chain.blocks[p] for p in pred_pos]
        if self.training and sc.stat is not None:
            self._record_norm(x if sc.stat == "x" else own_ax)
        if self._calib is not None:
            self._calib.observe(self, x, pred_pos)
        if self._merged is not None:
            a_m, b_m = self._merged
            return F.linear(F.linear(x.to(a_m.dtype), a_m), b_m)
        mid = sc.mid(self, preds, pred_pos, x, ax)
        if self.scaling != 1.0:
            mid = mid * self.scaling
        return F.linear(mid, sc.b_weight(self, preds))

    def _pred_blocks(self, pos: int | None, for_a: bool = False) -> list[ResLoRALinear]:
        if pos is None or (for_a and self.shortcut.name != "bs"):
            return []
        return [self._chain.blocks[p] for p in self._chain.preds(pos)]

    # -- statistics -------------------------------------------------------------------
    @torch.no_grad()
    def _record_norm(self, t: torch.Tensor) -> None:
        """Record ``||t||_F / sqrt(#vectors)``: the RMS vector norm, independent of batch size."""
        t = t.detach()
        value = torch.linalg.vector_norm(t.float()) / math.sqrt(max(1, t.numel() // t.shape[-1]))
        self.norm_window[self._norm_n % self.norm_window.numel()] = value
        self._norm_n += 1
        self.norm_count.fill_(self._norm_n)

    def sync_norm_count(self) -> None:
        """Re-read the window position after ``norm_count`` was loaded from a checkpoint."""
        self._norm_n = int(self.norm_count)

    def window_mean(self) -> torch.Tensor | None:
        """Mean of the recorded norms (``f_n``), or None when nothing was recorded."""
        n = min(int(self.norm_count), self.norm_window.numel())
        return self.norm_window[:n].double().mean() if n else None

    def extra_repr(self) -> str:
        return (
            f"{self.module_path}: in={self.in_features}, out={self.out_features}, r={self.lora_A.shape[0]}, "
            f"scaling={self.scaling:g}, res_type={self.shortcut.name}"
        )
