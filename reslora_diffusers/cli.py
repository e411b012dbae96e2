"""``reslora-merge``: turn a ResLoRA checkpoint into standard LoRA files (and a fused pipeline).

reslora-merge CHECKPOINT --base MODEL_DIR --output DIR [--merge input|weight|calibrated|sequential|distill]
              [--distill_steps N] [--format diffusers|kohya|comfyui|both] [--rank R] [--fuse] [--overwrite]

``--format`` takes any registered LoRA format (:mod:`reslora_diffusers.export.formats`), or
``both`` for every one of them that applies to the base's pipeline family.

The calibrated merges (and distill, which fits on the same batches) run on the pipeline
family's synthetic inputs here: random latents, timesteps and text states, not training data.
python -m reslora_diffusers.cli ...   (the same, from the checkout on the path)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .api import load_reslora_checkpoint
from .core.checkpoint import checkpoint_configs
from .core.config import MERGE_METHODS
from .export import lora_formats
from .merge.distill import DEFAULT_DISTILL_STEPS
from .training.run_folder import RunFolder
from .utils.io import atomic_dir, remove_stale_temporaries
from .utils.lock import folder_lock, user_entries
from .utils.safety import check_finite_file


def format_choices() -> dict[str, tuple[str, ...]]:
    """``--format``: each registered format by its name, and ``both``: every one of them (those
    that apply to the pipeline family are written: :func:`chosen_formats`)."""
    names = tuple(f.name for f in lora_formats())
    return {**{name: (name,) for name in names}, "both": names}


def chosen_formats(choice: str | None, comps: dict) -> tuple[str, ...] | None:
    """The formats ``--format choice`` writes for the pipeline components ``comps``: the one
    named, for ``both`` every registered format that applies to their family, None (the
    family's own) when not given."""
    from .frontends import components_family

    if choice is None:
        return None
    if choice != "both":
        return format_choices()[choice]
    family = components_family(comps)
    return tuple(f.name for f in lora_formats() if f.applies_to(family))


def merge_parser() -> argparse.ArgumentParser:
    # the docstring's first line, without its reST literal markup
    p = argparse.ArgumentParser(prog="reslora-merge", description=__doc__.split("\n")[0].replace("``", ""))
    p.add_argument("checkpoint", help="ResLoRA checkpoint (.safetensors) written by training")
    p.add_argument("--base", required=True, help="base diffusers pipeline: local folder or hub name")
    p.add_argument("--output", required=True, help="output directory (new or empty, unless --overwrite)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder that holds files: the outputs are replaced, other files kept",
    )
    p.add_argument("--merge", choices=MERGE_METHODS, default=None, help="default: the checkpoint's config")
    p.add_argument(
        "--format",
        choices=sorted(format_choices()),
        default=None,
        help="default: every format of the pipeline family (diffusers and kohya for SD/SDXL, diffusers for SD3 "
        "and Flux, diffusers and comfyui for FLUX.2 and Wan)",
    )
    p.add_argument(
        "--distill_steps",
        type=int,
        default=DEFAULT_DISTILL_STEPS,
        help="--merge distill: Adam steps fitting the merged LoRA to the ResLoRA model's outputs "
        "(on synthetic inputs)",
    )
    p.add_argument("--rank", type=int, default=None, help="truncate merged updates to this rank (SVD)")
    p.add_argument(
        "--fuse",
        action="store_true",
        help=f"also save the pipeline with merged weights in {RunFolder.FUSED}/",
    )
    p.add_argument(
        "--no_chain_report",
        action="store_true",
        help="report each merge method's total error only, not every chain's (faster on large UNets)",
    )
    return p


def merge_main(argv: list[str] | None = None) -> int:
    args = merge_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        report = run_merge(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"reslora-merge: error: {err}", file=sys.stderr)
        return 2
    for name, comp in report["components"].items():
        print(f"{name}: relative output error of the {report['merge']} merge: {comp['output_error']:.3e}")
    print(f"wrote {args.output}")
    return 0


def run_merge(args: argparse.Namespace) -> dict:
    ckpt = Path(args.checkpoint)
    if args.rank is not None and args.rank <= 0:
        raise ValueError(f"--rank {args.rank} must be > 0")
    if args.distill_steps < 0:
        raise ValueError(f"--distill_steps {args.distill_steps} must be >= 0")
    output = Path(args.output)
    check_output(output, args.overwrite)
    # one writer per folder: a second merge (or a training run) into it is refused meanwhile
    with folder_lock(output, "--output", "reslora-merge"):
        check_output(output, args.overwrite)  # again: a merge that ended meanwhile may have filled it
        return merge_into(args, ckpt, output)


def merge_into(args: argparse.Namespace, ckpt: Path, output: Path) -> dict:
    """:func:`run_merge` once it holds ``output``'s lock."""
    from diffusers import DiffusionPipeline

    from .export.pipeline import check_formats, fuse_lora, merge_components, write_lora_files
    from .frontends import remove_reslora_from_pipeline
    from .utils.quiet import loading_pipeline

    configs = checkpoint_configs(ckpt)
    check_finite_file(ckpt)
    if "" in configs:
        raise ValueError(f"{ckpt}: a single-model checkpoint; reslora-merge needs a pipeline checkpoint")
    try:
        with loading_pipeline():
            pipe = DiffusionPipeline.from_pretrained(args.base)
    except OSError as err:
        raise FileNotFoundError(
            f"--base {args.base}: not a pipeline folder, nor loadable by name ({err})"
        ) from err
    comps = {}
    for name in configs:
        module = getattr(pipe, name, None)
        if module is None:
            raise ValueError(f"{ckpt}: checkpoint has component {name!r}, the base pipeline has none")
        comps[name] = module
    formats = check_formats(chosen_formats(args.format, comps), comps)
    load_reslora_checkpoint(comps, ckpt)
    merged, report = merge_components(
        comps,
        args.merge,
        rank=args.rank,
        chain_report=not args.no_chain_report,
        distill_steps=args.distill_steps,
    )
    remove_stale_temporaries(output)
    # --fuse writes the whole pipeline: check the room for it before merging into the disk
    with atomic_dir(output, needed=pipeline_bytes(pipe) if args.fuse else None) as tmp:
        write_lora_files(tmp, merged, report, comps, formats, {"reslora_checkpoint": ckpt.name})
        if args.fuse:
            remove_reslora_from_pipeline(pipe)
            for name, lora in merged.items():
                fuse_lora(comps[name], lora)
            pipe.save_pretrained(str(RunFolder(tmp).fused_dir))
        # --overwrite: a LoRA file of another format is an earlier merge's, not this one's
        for path in RunFolder(output).lora_files().values():
            if not (tmp / path.name).exists():
                path.unlink(missing_ok=True)
    return report


def pipeline_bytes(pipe) -> int:
    """About the size of ``pipe.save_pretrained``: every model's parameters and buffers, plus
    1 MiB for configs, tokenizers and file headers."""
    import torch.nn as nn

    tensors = [
        t
        for module in pipe.components.values()
        if isinstance(module, nn.Module)
        for t in (*module.parameters(), *module.buffers())
    ]
    return sum(t.numel() * t.element_size() for t in tensors) + (1 << 20)


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an ``--output`` that is a file, or a folder holding files without ``--overwrite``."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a folder")
    if output.is_dir() and not overwrite:
        entries = user_entries(output)
        if entries:
            raise ValueError(
                f"--output {output} already holds files ({', '.join(entries[:3])}"
                f"{', ...' if len(entries) > 3 else ''}): choose a new folder, or --overwrite"
            )


if __name__ == "__main__":
    sys.exit(merge_main())
