"""Tiny models for the core tests (the ResLoRA formulas they are checked against: ``reference.py``)."""

from __future__ import annotations

import torch
import torch.nn as nn


class Layer(nn.Module):
    def __init__(self, d_in: int, d_out: int | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out or d_in)


class ResidualStack(nn.Module):
    """``h <- h + tanh(proj_n(h))``: the input of ``proj_n`` is the residual stream ``x_n``."""

    def __init__(self, d: int = 8, n_layers: int = 6) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(d) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.tanh(layer.proj(x))
        return x


class ScaleStack(nn.Module):
    """``x_{n+1} = c x_n`` exactly; the output concatenates every ``proj_n(x_n)``."""

    def __init__(self, d: int = 8, n_layers: int = 5, c: float = 0.7) -> None:
        super().__init__()
        self.c = c
        self.layers = nn.ModuleList(Layer(d) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for layer in self.layers:
            outs.append(layer.proj(x))
            x = self.c * x
        return torch.cat(outs, dim=-1)


class WidthStack(nn.Module):
    """``h <- proj_n(h)`` through changing widths, so links break where shapes differ."""

    def __init__(self, widths=(8, 8, 8, 6, 6, 8)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer.proj(x))
        return x


class Independent(nn.Module):
    """Each layer reads its own input, so layer n depends on layer n-1 only via shortcuts."""

    def __init__(self, d: int = 8, n_layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(d) for _ in range(n_layers))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer.proj(x) for layer, x in zip(self.layers, xs)]


class Reordered(nn.Module):
    """``late`` is registered before ``early`` but runs after it (like diffusers' up/mid blocks)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.late = nn.ModuleList(Layer(d) for _ in range(2))
        self.early = nn.ModuleList(Layer(d) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in list(self.early) + list(self.late):
            x = x + torch.tanh(layer.proj(x))
        return x


def randomize_lora(model: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Give every lora_B a non-zero value (B starts at zero) so every term is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B") or name.endswith("lora_A"):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
