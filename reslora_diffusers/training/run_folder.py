"""The output folder of a training run: what is in it (:class:`RunFolder`), and never two runs in one.

:class:`RunFolder` is the one place that names a run folder's files: the LoRA files (one per
format, :mod:`reslora_diffusers.export`), the merge report, the ResLoRA checkpoint, the
training log (read and written: :class:`TrainLog`), the validation grids, the model card and
the checkpoint folders. The training script writes it, ``reslora-merge`` writes the LoRA files
and report of its ``--output`` folder, the demo and the benchmarks read it.

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

from ..core import get_shortcut
from ..core.checkpoint import checkpoint_configs
from ..export import DIFFUSERS_FILE, REPORT_FILE, lora_formats
from ..utils.io import atomic_path, remove_stale_temporaries
from ..utils.lock import folder_lock, user_entries

logger = logging.getLogger(__name__)

#: inside each ``checkpoint-<step>`` folder: the flags of the run that wrote it
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


class RunFolder:
    """A training run's output folder (or ``reslora-merge``'s): its files by name, its log, its
    merge report and the label the demo and the benchmarks show for it."""

    #: ``train_log.jsonl``: one JSON record a line (:class:`TrainLog`)
    LOG = "train_log.jsonl"
    #: the unmerged ResLoRA weights (``load_reslora_checkpoint``, ``reslora-merge``)
    CHECKPOINT = "reslora_checkpoint.safetensors"
    #: inside each ``checkpoint-<step>`` folder of a ``--use_peft`` run: the PEFT LoRA layers
    PEFT_CHECKPOINT = "peft_lora.safetensors"
    #: the model card
    CARD = "README.md"
    #: the validation grids, ``<name>.png``; the last one ``final.png``
    VALIDATION = "validation"
    #: ``reslora-merge --fuse``: the pipeline with the merged weights
    FUSED = "fused_pipeline"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, path: str | Path) -> RunFolder:
        """The run folder ``path`` is, or holds (a LoRA file of the run)."""
        path = Path(path)
        return cls(path if path.is_dir() else path.parent)

    # -- paths -----------------------------------------------------------------------------
    @property
    def lora_file(self) -> Path:
        """The diffusers file, the one ``pipe.load_lora_weights(folder)`` reads."""
        return self.path / DIFFUSERS_FILE

    def lora_files(self) -> dict[str, Path]:
        """``{format name: path}`` of every registered LoRA format (written or not)."""
        return {fmt.name: self.path / fmt.file_name for fmt in lora_formats()}

    @property
    def report_file(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def checkpoint_file(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def log_file(self) -> Path:
        return self.path / self.LOG

    @property
    def card_file(self) -> Path:
        return self.path / self.CARD

    @property
    def validation_dir(self) -> Path:
        return self.path / self.VALIDATION

    def grid(self, name: str) -> Path:
        """The validation grid ``name`` (``step-000400``, ``final``)."""
        return self.validation_dir / f"{name}.png"

    @property
    def fused_dir(self) -> Path:
        return self.path / self.FUSED

    def has_lora(self) -> bool:
        """Whether the run exported its LoRA (the diffusers file is there)."""
        return self.lora_file.is_file()

    def outputs(self, logging_dir: str) -> list[Path]:
        """What a training run wrote here (``logging_dir``: its TensorBoard folder), the
        ``checkpoint-<step>`` folders included: what ``--overwrite_output_dir`` removes."""
        names = (
            self.LOG,
            *(p.name for p in self.lora_files().values()),
            REPORT_FILE,
            self.CHECKPOINT,
            self.CARD,
            self.VALIDATION,
            logging_dir,
        )
        found = [self.path / name for name in names if (self.path / name).exists()]
        found += [p for p in self.path.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")]
        return found

    # -- the log ---------------------------------------------------------------------------
    def read_log(self) -> list[dict]:
        """The training log's records (none without a log; :func:`read_train_log`)."""
        return read_train_log(self.log_file) if self.log_file.is_file() else []

    def open_log(self, resume_step: int) -> TrainLog:
        """The log for a run starting at ``resume_step`` (0: a new run)."""
        return TrainLog(self.log_file, resume_step)

    def accuracies(self) -> list[tuple[int, float]]:
        """``(step, prompt accuracy)`` of the validations and the final evaluation, by step."""
        rows = self.read_log()
        return sorted((r["step"], r["prompt_accuracy"]) for r in rows if r.get("prompt_accuracy") is not None)

    def final_record(self) -> dict | None:
        """The final evaluation's record (the exported LoRA as a user loads it), if any."""
        return next((r for r in reversed(self.read_log()) if r.get("kind") == "final"), None)

    def steps_trained(self) -> int | None:
        """The last step with a training loss (None before the first)."""
        return max((r["step"] for r in self.read_log() if "loss" in r), default=None)

    # -- the merge report and the label ----------------------------------------------------
    def merge_report(self) -> dict | None:
        """``merge_report.json`` (None where the run wrote none: ``--use_peft``, not finished)."""
        return json.loads(self.report_file.read_text()) if self.report_file.is_file() else None

    def trained_plain_lora(self) -> bool:
        """Whether the run trained a plain LoRA (``--res_type none``): nothing was merged, as its
        shortcut type says (no report, or a type this process does not know: no)."""
        report = self.merge_report() or {}
        try:
            return get_shortcut(report.get("res_type", ""), int(report.get("pre_num", 0))).plain
        except ValueError:
            return False

    def label(self) -> str:
        """``LoRA (lora)`` / ``ResLoRA ms m=1 (reslora)`` from the merge report (``m=`` where the
        type uses ``pre_num``); the folder's name alone where there is no report."""
        report = self.merge_report()
        if report is None:
            return self.path.name
        if self.trained_plain_lora():
            return f"LoRA ({self.path.name})"
        res_type, pre_num = report.get("res_type"), report.get("pre_num")
        try:
            title = get_shortcut(res_type or "", int(pre_num or 0)).title
        except ValueError:  # a type registered by a plugin this process has not imported
            title = f"ResLoRA {res_type} m={pre_num}"
        return f"{title} ({self.path.name})"


class TrainLog:
    """``train_log.jsonl``: one JSON line per step (step, loss, lr, time) and per validation.

    A resume keeps the records up to its step (:func:`read_train_log`, which drops a line torn
    by a crash mid-write), rewritten atomically; a new run starts it empty.
    """

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        kept = []
        if path.exists() and resume_step > 0:
            kept = [r for r in read_train_log(path) if r["step"] <= resume_step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.records = kept

    def write(self, record: dict) -> None:
        self.records.append(record)
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk, say: main's one line names the log
            err.filename = err.filename or str(self.path)
            raise

    def accuracy_at(self, step: int) -> float | None:
        found = [
            r["prompt_accuracy"]
            for r in self.records
            if r.get("kind") == "validation" and r["step"] == step and "prompt_accuracy" in r
        ]
        return found[0] if found else None


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
        removed = RunFolder(output_dir).outputs(args.logging_dir)
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
