"""A one-minute tour of the ResLoRA core on a toy residual network (no downloads).

Trains plain LoRA and each ResLoRA type on the same regression task, then merges every
ResLoRA model into a plain LoRA and prints the merge error of each method.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from reslora_diffusers import ResLoRAConfig, add_reslora, compare_merges, res_types, trainable_parameters
from reslora_diffusers.core import MERGE_METHODS


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)


class Stack(nn.Module):
    """``x <- x + tanh(proj_n(x))``: the ``proj`` layers form one ResLoRA chain."""

    def __init__(self, d: int, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.tanh(layer.proj(x))
        return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pre_num", type=int, default=2)
    args = parser.parse_args()

    d, n_layers = 32, 8
    torch.manual_seed(0)
    teacher = Stack(d, n_layers)
    base_state = Stack(d, n_layers).state_dict()
    data = [torch.randn(64, d) for _ in range(8)]
    held_out = [torch.randn(64, d) for _ in range(2)]

    print(f"{'method':8} {'final loss':>10}  merge error ({' / '.join(MERGE_METHODS)})")
    for res_type in res_types():
        torch.manual_seed(1)
        model = Stack(d, n_layers)
        model.load_state_dict(base_state)
        # record_norms: the comparison includes merge="input", which reads the training norm windows
        cfg = ResLoRAConfig(
            rank=4,
            alpha=8,
            res_type=res_type,
            pre_num=args.pre_num,
            target_modules=["proj"],
            record_norms=True,
        )
        add_reslora(model, cfg)
        opt = torch.optim.AdamW(trainable_parameters(model), lr=3e-3)
        for step in range(args.steps):
            x = data[step % len(data)]
            loss = (model(x) - teacher(x).detach()).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        errors = compare_merges(model, held_out, calibration=data)
        print(f"{res_type:8} {loss.item():10.4f}  " + " / ".join(f"{errors[m]:.2e}" for m in errors))


if __name__ == "__main__":
    main()
