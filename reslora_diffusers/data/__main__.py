"""Write the embedded base or fine-tuning set to a folder (imagefolder + metadata.jsonl).

python -m reslora_diffusers.data base OUT_DIR [--num-images N] [--seed S]
python -m reslora_diffusers.data finetune OUT_DIR [--num-images N] [--seed S]
"""

from __future__ import annotations

import argparse

from .sets import FINETUNE_NUM_IMAGES, FINETUNE_SEED, make_base_set, make_finetune_set
from .shapes import RESOLUTION

_DEFAULTS = {"base": (10_000, 0), "finetune": (FINETUNE_NUM_IMAGES, FINETUNE_SEED)}


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and write the chosen set."""
    parser = argparse.ArgumentParser(
        prog="python -m reslora_diffusers.data",
        description="Write a procedurally generated coloured-shape image-caption set in imagefolder layout.",
    )
    parser.add_argument("which", choices=sorted(_DEFAULTS), help="base set or fine-tuning concept set")
    parser.add_argument("out_dir", help="folder to write the PNGs and metadata.jsonl into")
    parser.add_argument(
        "--num-images", type=int, help=f"default: 10000 (base) / {FINETUNE_NUM_IMAGES} (finetune)"
    )
    parser.add_argument("--seed", type=int, help=f"default: 0 (base) / {FINETUNE_SEED} (finetune)")
    parser.add_argument("--resolution", type=int, default=RESOLUTION, help="image side in pixels")
    args = parser.parse_args(argv)
    num_images, seed = _DEFAULTS[args.which]
    num_images = args.num_images if args.num_images is not None else num_images
    seed = args.seed if args.seed is not None else seed
    make = make_base_set if args.which == "base" else make_finetune_set
    out = make(args.out_dir, num_images=num_images, seed=seed, resolution=args.resolution)
    print(f"wrote {num_images} images to {out}")


if __name__ == "__main__":
    main()
