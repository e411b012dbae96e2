"""Compiled ``is`` steps with and without its shared-input groups, interleaved in one run.

``is`` folds ``x_n + c x_{n-1}`` once per group of q/k/v projections (``core/fusion.py``). The
ungrouped variant is the same model with each ``to_k`` block's scale ``c`` set to the float32
number next to 1.0: a group forms only where its members' ``c`` are equal, so every block
folds and applies its own ``A``, with the same arithmetic to within one rounding of ``c``.
Both run against PEFT LoRA through ``bench_step.py``'s table (paired ratios, compile time)::

    python benchmarks/bench_is_groups.py --sizes small mid --rounds 25
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch._inductor import config as inductor_config

from reslora_diffusers.core.inject import get_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402

UNGROUPED = "is-ungrouped"
NEXT_TO_ONE = float(np.nextafter(np.float32(1.0), np.float32(2.0)))
_reslora_variant = bench_step.reslora_variant


def variant(base, rank: int, res_type: str, pre_num: int, targets: list[str]):
    """``bench_step.reslora_variant``, with ``is-ungrouped`` built as ``is`` whose groups cannot form."""
    if res_type != UNGROUPED:
        return _reslora_variant(base, rank, res_type, pre_num, targets)
    unet, params = _reslora_variant(base, rank, "is", pre_num, targets)
    with torch.no_grad():
        for path, block in get_state(unet).blocks.items():
            if path.endswith("to_k"):
                block.shortcut_scale.fill_(NEXT_TO_ONE)
    return unet, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=["small", "mid"], default=["small", "mid"])
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    inductor_config.force_disable_caches = True  # every variant compiles from scratch
    bench_step.reslora_variant = variant
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    targets = bench_step.TARGET_SETS["unet"]["attention"]
    for size in args.sizes:
        bench_step.bench_size(
            "unet", size, args.rounds, 8, targets, [("is", 1), (UNGROUPED, 1)], compiled=True
        )


if __name__ == "__main__":
    main()
