#!/usr/bin/env python
"""Write a diffusers pipeline folder with random weights in a published architecture.

    python scripts/make_random_pipeline.py --preset sd15|sdxl|sd3|flux|qwen-image|z-image|flux2|wan OUTPUT
                                           [--scale F] [--dtype bf16]

The configs are SD 1.5's, SDXL base's, SD3 medium's, Flux dev's, Qwen-Image's, Z-Image's,
FLUX.2 [dev]'s and Wan 2.1 T2V 14B's (numbers in ``reslora_diffusers/data/random_pipelines.py``);
``--scale`` shrinks widths and depths for CPU runs. The folder loads with
``DiffusionPipeline.from_pretrained`` and trains with ``train_text_to_image.py
--pretrained_model_name_or_path OUTPUT``, so the training script and the benchmarks can be timed
at full size without a download. The weights are random: the
numbers it produces are timings and memory, never image quality.
"""

from __future__ import annotations

import argparse
import sys

import torch

from reslora_diffusers.data.random_pipelines import PRESETS, save_random_pipeline

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--preset", required=True, choices=PRESETS)
    p.add_argument("output", help="a new folder")
    p.add_argument("--scale", type=float, default=1.0, help="shrink widths and depths, in (0, 1]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameter dtype")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        path = save_random_pipeline(args.preset, args.output, args.scale, DTYPES[args.dtype], args.seed)
    except ValueError as err:
        sys.exit(f"make_random_pipeline.py: error: {err}")
    print(path)


if __name__ == "__main__":
    main()
