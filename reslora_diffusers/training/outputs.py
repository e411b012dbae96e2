"""The output folder of a training run: never mix two runs in one folder.

A new run refuses a folder that already holds files, unless ``--overwrite_output_dir`` (which
removes the previous run's outputs first and nothing else) or ``--resume_from_checkpoint``
(which continues the run that is there). While a run writes, it holds the folder's lock
(:mod:`reslora_diffusers.utils.lock`), so a second run started into it is refused. Every checkpoint
records the flags that decide what its weights mean (``run.json``), and a resume under other
flags is refused; a checkpoint without ``run.json`` is checked against the ResLoRA config its
weights file stores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..core.checkpoint import checkpoint_configs
from ..utils.io import remove_stale_temporaries
from ..utils.lock import folder_lock, user_entries

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
TRAIN_LOG = "train_log.jsonl"
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
        TRAIN_LOG,
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
    entries = user_entries(output_dir)
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


def read_train_log(path: Path) -> list[dict]:
    """The records of a ``train_log.jsonl``, one JSON object a line.

    A last line that is not complete JSON is what a crash in the middle of writing it leaves:
    it is dropped with a warning. Any other line that does not parse is an error naming the
    file and line.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err})") from err
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records = []
    for n, line in numbered:
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer 'step'")
        except ValueError as err:
            if n == numbered[-1][0]:
                logger.warning(
                    "%s: dropped its last line %d, cut off by an interrupted write (%s)", path, n, err
                )
                break
            raise ValueError(f"{path} line {n} is not a training log record ({err})") from err
        records.append(record)
    return records


@contextlib.contextmanager
def hold_output_dir(args: argparse.Namespace, main_process: bool) -> Iterator[None]:
    """The main process holds ``--output_dir``'s lock for the block, with the folder checked
    again under it (a run that ended meanwhile may have filled it) and prepared
    (:func:`prepare_output_dir`); the other processes write only where the main one says."""
    if not main_process:
        yield
        return
    with folder_lock(args.output_dir, "--output_dir", "train_text_to_image.py"):
        check_output_dir(args)
        prepare_output_dir(args)
        yield


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


def check_resume_identity(
    checkpoint: Path, identity: dict, weights: Path | None = None, denoiser: str | None = None
) -> None:
    """Refuse to continue ``checkpoint`` under flags that give a different model.

    Without ``run.json`` (a checkpoint of an older version, or copied without it) the flags are
    compared with the ResLoRA config stored in its ``weights`` file, whose ``denoiser``
    component carries the targets.
    """
    record = checkpoint / RUN_FILE
    if record.is_file():
        try:
            stored = json.loads(record.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"--resume_from_checkpoint: {record} is damaged ({err})") from err
    elif weights is not None and weights.is_file():
        stored = checkpoint_identity(weights, denoiser)
        logger.warning(
            "%s has no %s: checked the adapter flags its weights record, not the base or the schedule",
            checkpoint,
            RUN_FILE,
        )
    else:
        logger.warning(
            "%s has no %s: cannot check that it was trained with these flags", checkpoint, RUN_FILE
        )
        return
    for flag, value in identity.items():
        if flag in stored and stored[flag] != value:
            raise ValueError(
                f"--resume_from_checkpoint: {checkpoint} belongs to a run with --{flag} {_shown(stored[flag])}, "
                f"this run has --{flag} {_shown(value)}"
            )


def checkpoint_identity(weights: Path, denoiser: str | None) -> dict:
    """The flags of :data:`IDENTITY_FLAGS` that a ResLoRA checkpoint's stored config records."""
    configs = checkpoint_configs(weights)
    main = configs.get(denoiser) or next(iter(configs.values()))
    identity = {
        "res_type": main.res_type,
        "pre_num": main.pre_num,
        "rank": main.rank,
        "lora_alpha": main.alpha,
        "train_text_encoder": len(configs) > 1,
    }
    if main.target_modules is not None:
        identity["target_modules"] = list(main.target_modules)
    return identity


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
