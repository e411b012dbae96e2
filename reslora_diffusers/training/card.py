"""The model card (``README.md``) that ``train_text_to_image.py`` writes beside the LoRA files."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from ..core import get_shortcut
from ..data import default_base_model_path, default_dit_base_path
from ..export import DIFFUSERS, REPORT_FILE, get_format
from ..utils.io import atomic_path
from .run_folder import RunFolder

CARD = """---
library_name: diffusers
base_model: {base_id}
tags:
- text-to-image
- lora
- reslora
---
# {title}

A LoRA for `{base_id}` trained with `train_text_to_image.py` of reslora-diffusers.

| | |
|---|---|
| base model | {base_text} |
| data | {data} |
| method | {method} |
| steps | {steps} (batch {batch} x {accum} accumulation x {procs} process(es)), learning rate {lr} |
| merge output error (lower is better) | {output_error} |
| prompt accuracy | {accuracy} |

{grid}

## Use

```python
from diffusers import DiffusionPipeline
{base_import}
pipe = DiffusionPipeline.from_pretrained({base_arg})
pipe.load_lora_weights("{output_dir}")  # {lora_file}
```

{files}

## Command

```bash
{command}
```
"""


def base_model_id(base: str) -> str:
    """What the card's ``base_model:`` names: a hub id as given, a local folder by its name (an
    absolute path of the training machine means nothing to a reader or to the hub)."""
    path = Path(base).expanduser()
    return path.resolve().name if path.exists() else base


def embedded_base_function(base: str) -> str | None:
    """The name of the function of :mod:`reslora_diffusers.data` that returns ``base``'s folder
    when ``base`` is one of the bases shipped with the package, else None."""
    path = Path(base).expanduser()
    if not path.exists():
        return None
    for function in (default_base_model_path, default_dit_base_path):
        if path.resolve() == Path(function()).resolve():
            return function.__name__
    return None


def base_text(base: str) -> str:
    """The base model for the card's table: its id, and for a local folder where it was, as the
    command line gave it (resolving it would print the training machine's absolute path)."""
    embedded = embedded_base_function(base)
    if embedded:
        return f"`{base_model_id(base)}` (shipped with reslora-diffusers: `{embedded}()`)"
    if Path(base).expanduser().exists():
        return f"`{base_model_id(base)}` (local folder `{base}`)"
    return f"`{base}` (hub)"


def base_code(base: str) -> tuple[str, str]:
    """``(import line, argument)`` of the card's ``from_pretrained`` call: a shipped base through
    its function (its folder differs on every install), any other base as given."""
    embedded = embedded_base_function(base)
    if embedded:
        return f"from reslora_diffusers.data import {embedded}\n", f"{embedded}()"
    return "", json.dumps(base)


def method_text(args: argparse.Namespace, denoiser: str = "UNet") -> str:
    where = " ".join(f"`{t}`" for t in args.target_modules)
    where = f"{denoiser} ({where})" + (" and text encoder" if args.train_text_encoder else "")
    if args.use_peft:
        return f"PEFT LoRA, rank {args.rank}, alpha {args.lora_alpha or args.rank}, {where}"
    shortcut = get_shortcut(args.res_type, args.pre_num)
    if shortcut.plain:  # nothing was merged: the trained LoRA is the file
        return f"LoRA (`--res_type {args.res_type}`), rank {args.rank}, alpha {args.lora_alpha or args.rank}, {where}"
    text = f"ResLoRA `{args.res_type}`"
    if shortcut.uses_pre_num:
        text += f" (pre_num {args.pre_num})"
    if args.shortcut_schedule != "constant":  # the shipped file is then the trained model itself
        text += (
            f", shortcuts decayed to 0 by the `{args.shortcut_schedule}` schedule from "
            f"{args.shortcut_decay_start:.0%} of training"
        )
    return (
        text
        + f", rank {args.rank}, alpha {args.lora_alpha or args.rank}, merged with `{args.merge}`, {where}"
    )


def files_text(args: argparse.Namespace, formats: tuple[str, ...] = ("diffusers", "kohya")) -> str:
    """The files of ``output_dir``: the LoRA file of each of ``formats`` (the pipeline family's),
    merge report and ResLoRA checkpoint from ResLoRA runs (``--use_peft`` writes diffusers' own
    LoRA file alone)."""
    written = (DIFFUSERS.name,) if args.use_peft else formats
    files = [f"`{get_format(name).file_name}` ({get_format(name).description})" for name in written]
    if not args.use_peft:
        files += [
            f"`{REPORT_FILE}` (relative output error of the merged LoRA against the trained "
            "ResLoRA model on held-out inputs from the training data)",
            f"`{RunFolder.CHECKPOINT}` (the unmerged ResLoRA weights, to continue training)",
        ]
    files += [
        f"`{RunFolder.LOG}` (step, loss, lr, time; validation accuracy)",
        f"`{RunFolder.VALIDATION}/` (image grids: one row per seed, one column per prompt)",
    ]
    if args.checkpointing_steps:
        files.append(
            f"`checkpoint-N/` (every {args.checkpointing_steps} steps, for `--resume_from_checkpoint`)"
        )
    if args.report_to == "tensorboard":
        files.append(f"`{args.logging_dir}/` (TensorBoard: loss and learning rate)")
    return "Files: " + ", ".join(files) + "."


def output_error_text(report: dict | None) -> str:
    if not report:
        return "n/a (plain LoRA, nothing to merge)"
    return ", ".join(f"{name}: {comp['output_error']:.2e}" for name, comp in report["components"].items())


def accuracy_text(before: float | None, after: float | None, images: int) -> str:
    if after is None:
        return "n/a (the validation prompts are not coloured-shape captions)"
    start = f"{before:.1%} before -> " if before is not None else ""
    return f"{start}{after:.1%} after training ({images} images, colour, shape and background all right)"


def write_model_card(
    output_dir: Path,
    args: argparse.Namespace,
    argv: list[str],
    data_text: str,
    num_processes: int,
    report: dict | None,
    accuracy: tuple[float | None, float | None, int],
    grid: Path | None,
    denoiser: str = "UNet",
    formats: tuple[str, ...] = ("diffusers", "kohya"),
) -> Path:
    """Write ``output_dir/README.md``: base model, data, method, flags, final metric, grid
    (``denoiser``: how the method names the trained model; ``formats``: the LoRA files written)."""
    card = CARD.format(
        title=Path(output_dir).name,
        base_import=base_code(args.pretrained_model_name_or_path)[0],
        base_arg=base_code(args.pretrained_model_name_or_path)[1],
        base_id=base_model_id(args.pretrained_model_name_or_path),
        base_text=base_text(args.pretrained_model_name_or_path),
        data=data_text,
        method=method_text(args, denoiser),
        steps=args.max_train_steps,
        batch=args.train_batch_size,
        accum=args.gradient_accumulation_steps,
        procs=num_processes,
        lr=args.learning_rate,
        output_error=output_error_text(report),
        accuracy=accuracy_text(*accuracy),
        grid=f"Final samples:\n\n![samples]({grid.relative_to(output_dir).as_posix()})" if grid else "",
        output_dir=output_dir,
        lora_file=DIFFUSERS.file_name,
        files=files_text(args, formats),
        command=shlex.join(["python", "train_text_to_image.py", *argv]),
    )
    path = RunFolder(output_dir).card_file
    with atomic_path(path) as tmp:
        tmp.write_text(card)
    return path
