"""Training checkpoints: ``output_dir/checkpoint-<step>`` folders written by accelerate.

Every folder holds the adapter weights (the ResLoRA checkpoint with its norm windows, or
the PEFT LoRA layers with ``--use_peft``), never whole models, and accelerate's optimizer,
scheduler and per-process RNG states. Folders are written under a
temporary name and renamed when complete, so a crash never leaves a partial checkpoint.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from ..utils.errors import one_line
from ..utils.io import disk_space, replace
from ..utils.safety import load_safetensors
from .run_folder import write_run_identity

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of ``output_dir``, oldest (lowest step) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: str | Path) -> int:
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"--resume_from_checkpoint: {path} is not a checkpoint-<step> folder")
    return int(match[1])


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The folder to resume from: ``latest`` in ``output_dir`` (None if there is none) or a path.

    A bare folder name (``checkpoint-4``, as diffusers' scripts take it) is looked up in
    ``output_dir`` first, then in the working folder.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.info("no checkpoint in %s to resume from; starting a new run", output_dir)
        return found[-1] if found else None
    path = Path(resume)
    tried = [path]
    if len(path.parts) == 1:
        tried.insert(0, Path(output_dir) / path)
    found = next((p for p in tried if p.is_dir()), None)
    if found is None:
        where = " nor ".join(str(p) for p in tried)
        raise ValueError(f"--resume_from_checkpoint: {where} does not exist")
    checkpoint_step(found)
    return found


def check_resume_step(checkpoint: Path, max_train_steps: int) -> int:
    """The step of ``checkpoint``, refused when it is past ``--max_train_steps``: the run would
    train on past its end (and label its export with the smaller count). A checkpoint at
    exactly ``--max_train_steps`` has nothing left to train and is exported as it is."""
    step = checkpoint_step(checkpoint)
    if step > max_train_steps:
        raise ValueError(
            f"--resume_from_checkpoint: {checkpoint} is at step {step}, past --max_train_steps "
            f"{max_train_steps}; give --max_train_steps {step} to export it as it is, or more to "
            "continue training"
        )
    return step


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    total_limit: int | None,
    identity: dict | None = None,
    needed: int | None = None,
) -> Path:
    """``accelerator.save_state`` into ``checkpoint-<step>`` atomically; keep the newest ``total_limit``.

    ``identity`` (the run's model-defining flags) is written beside the states, so that a
    resume can check it continues the same run. ``needed`` (bytes, where known) is checked
    against the free space first; a full disk is one ``DiskFullError`` naming the file, and
    the partial folder is removed. Every process must call this (each one writes its own RNG
    state).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        with disk_space(final, tmp, needed if accelerator.is_main_process else None):
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process and identity is not None:
                write_run_identity(tmp, identity)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def check_checkpoint_files(
    path: Path, weights_file: str, process_index: int, allow_partial: bool = False
) -> None:
    """Open every state a resume from ``path`` restores, so that a damaged or missing file is
    one error naming it rather than a failure deep inside accelerate.

    accelerate skips random states it cannot read with an INFO line, which makes the resumed
    run silently differ from an uninterrupted one: that is an error here, or with
    ``allow_partial`` a warning.
    """
    from accelerate.utils import load

    load_safetensors(path / weights_file)
    for name in ("optimizer.bin", "scheduler.bin"):
        _load_state(path / name, load)
    rng = path / f"random_states_{process_index}.pkl"
    try:
        states = _load_state(rng, load)
        missing = {"random_state", "numpy_random_seed", "torch_manual_seed"} - set(states)
        if missing:
            raise ValueError(f"--resume_from_checkpoint: {rng} lacks {sorted(missing)[0]!r}")
    except (ValueError, FileNotFoundError) as err:
        if not allow_partial:
            raise ValueError(f"{err}; --allow_partial_resume continues without these random states") from err
        logger.warning("%s: the resumed run continues without them and will not repeat the original", err)


def _load_state(path: Path, load):
    if not path.is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint: {path} is missing")
    try:
        return load(path, map_location="cpu")
    except Exception as err:  # torch.load raises many types (RuntimeError, EOFError, UnpicklingError)
        raise ValueError(f"--resume_from_checkpoint: {path} is damaged ({one_line(err)[:200]})") from err
