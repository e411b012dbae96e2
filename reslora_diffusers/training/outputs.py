"""The output folder of a training run: never mix two runs in one folder.

A new run refuses a folder that already holds files, unless ``--overwrite_output_dir`` (which
removes the previous run's outputs first and nothing else) or ``--resume_from_checkpoint``
(which continues the run that is there). Every checkpoint records the flags that decide
what its weights mean (``run.json``), and a resume under other flags is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

from ..utils.io import is_temporary, remove_stale_temporaries

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
#: flags that change the model a checkpoint's weights belong to
IDENTITY_FLAGS = (
    "pretrained_model_name_or_path",
    "revision",
    "variant",
    "use_peft",
    "res_type",
    "pre_num",
    "rank",
    "lora_alpha",
    "target_modules",
    "train_text_encoder",
    "shortcut_schedule",
    "shortcut_decay_start",
)


def run_outputs(output_dir: Path, logging_dir: str) -> list[Path]:
    """What a training run writes into ``output_dir`` (besides ``checkpoint-<step>`` folders)."""
    names = (
        "train_log.jsonl",
        "pytorch_lora_weights.safetensors",
        "lora_kohya.safetensors",
        "merge_report.json",
        "reslora_checkpoint.safetensors",
        "README.md",
        "validation",
        logging_dir,
    )
    found = [output_dir / name for name in names if (output_dir / name).exists()]
    found += [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")]
    return found


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuse an ``--output_dir`` that is a file, cannot be written or holds another run.

    Read-only: every process may call it before anything is loaded.
    """
    output_dir = Path(args.output_dir)
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        raise ValueError("--overwrite_output_dir and --resume_from_checkpoint exclude each other")
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == output_dir else f" ({existing} is a file)"
        raise ValueError(f"--output_dir {output_dir} cannot be a folder{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output_dir {output_dir}: {existing} is not writable")
    if existing != output_dir or args.overwrite_output_dir:
        return
    entries = sorted(p.name for p in output_dir.iterdir() if not is_temporary(p))
    if args.resume_from_checkpoint == "latest":
        if entries and not any(name.startswith("checkpoint-") for name in entries):
            raise ValueError(
                f"--resume_from_checkpoint latest: {output_dir} holds files but no checkpoint-<step> "
                "folder to continue from; --overwrite_output_dir starts the run again"
            )
    elif entries and not args.resume_from_checkpoint:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ValueError(
            f"--output_dir {output_dir} already holds files ({shown}): choose a new folder, continue "
            "its run with --resume_from_checkpoint latest, or replace it with --overwrite_output_dir"
        )


def prepare_output_dir(args: argparse.Namespace) -> None:
    """Create ``--output_dir`` (main process, after :func:`check_output_dir`): with
    ``--overwrite_output_dir`` remove the previous run's outputs first, always what an
    interrupted write left behind."""
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    if args.overwrite_output_dir:
        removed = run_outputs(output_dir, args.logging_dir)
        for path in removed:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        if removed:
            logger.info("--overwrite_output_dir: removed %s", ", ".join(p.name for p in removed))


def run_identity(args: argparse.Namespace) -> dict:
    """The flags that must match for a checkpoint to continue this run (``RUN_FILE``)."""
    identity = {flag: getattr(args, flag) for flag in IDENTITY_FLAGS}
    base = Path(args.pretrained_model_name_or_path)
    if base.exists():  # the same local folder however the path is spelled
        identity["pretrained_model_name_or_path"] = str(base.resolve())
    identity["lora_alpha"] = args.lora_alpha or args.rank
    identity["target_modules"] = list(args.target_modules)
    return identity


def write_run_identity(folder: Path, identity: dict) -> None:
    (folder / RUN_FILE).write_text(json.dumps(identity, indent=2) + "\n")


def check_resume_identity(checkpoint: Path, identity: dict) -> None:
    """Refuse to continue ``checkpoint`` under flags that give a different model."""
    record = checkpoint / RUN_FILE
    if not record.is_file():
        logger.warning(
            "%s has no %s: cannot check that it was trained with these flags", checkpoint, RUN_FILE
        )
        return
    try:
        stored = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--resume_from_checkpoint: {record} is damaged ({err})") from err
    for flag, value in identity.items():
        if flag in stored and stored[flag] != value:
            raise ValueError(
                f"--resume_from_checkpoint: {checkpoint} belongs to a run with --{flag} {_shown(stored[flag])}, "
                f"this run has --{flag} {_shown(value)}"
            )


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
