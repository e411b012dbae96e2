"""train_text_to_image.py when things go wrong: an output folder on another filesystem, two
runs into one folder, a full disk, a log torn by a crash, resumes past the end or from a
checkpoint without its run record, and the messages of mistyped flags.

The base and data are conftest.py's (a random tiny UNet pipeline, 8 images).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reslora_diffusers.cli import merge_main
from reslora_diffusers.utils.lock import LOCK_FILE
from tests.mounts import fill, simulate_mount, tmpfs
from tests.runs import ROOT, SCRIPT, error, from_checkpoint, records, run

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


STEPS = ["--max_train_steps", "2", "--checkpointing_steps", "1"]


def _no_temporaries(folder: Path) -> None:
    left = [p for p in folder.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert not left, left


# -- 1. an output folder on another filesystem ---------------------------------------------


@pytest.mark.slow
def test_training_resume_and_merge_on_tmpfs_mount_points(base, data, tmp_path, capsys):
    """The output folder is a mount point (a tmpfs): the export moved from a temporary folder
    beside it failed with EXDEV after all of training."""
    with tmpfs(tmp_path / "vol") as vol, tmpfs(tmp_path / "merged") as merged:
        run(base, data, vol, *STEPS)
        assert (vol / "pytorch_lora_weights.safetensors").is_file()
        shutil.rmtree(vol / "checkpoint-2")  # resume from step 1 into the mount, to step 3
        run(
            base,
            data,
            vol,
            "--max_train_steps",
            "3",
            "--checkpointing_steps",
            "1",
            "--resume_from_checkpoint",
            "latest",
        )
        assert [r["step"] for r in records(vol)] == [1, 2, 3]
        assert (vol / "checkpoint-3").is_dir()
        ckpt = vol / "reslora_checkpoint.safetensors"
        (merged / "lost+found").mkdir()  # the root of an ext4 volume has one: not an earlier output
        assert merge_main([str(ckpt), "--base", str(base), "--output", str(merged), "--fuse"]) == 0
        assert (merged / "pytorch_lora_weights.safetensors").is_file()
        assert (merged / "fused_pipeline" / "model_index.json").is_file()
        for folder in (vol, merged):
            _no_temporaries(folder)
            assert not (folder / LOCK_FILE).exists()


@pytest.mark.slow
def test_training_and_resume_into_a_folder_renames_cannot_leave(base, data, tmp_path, monkeypatch):
    """The same without a mount: renames into or out of the output folder fail with EXDEV, as
    at a mount point, so every temporary file must be made inside it."""
    out = tmp_path / "volume"
    out.mkdir()  # a mount point exists before the run
    refused = simulate_mount(monkeypatch, out)
    run(base, data, out, *STEPS)
    shutil.rmtree(out / "checkpoint-2")
    run(base, data, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert refused == []
    assert [r["step"] for r in records(out)] == [1, 2, 3]
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "lora_kohya.safetensors").is_file()
    _no_temporaries(out)


# -- 2. two runs into one folder ------------------------------------------------------------


def _script_cmd(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(base)]
    cmd += ["--train_data_dir", str(data), "--output_dir", str(out), "--train_batch_size", "3"]
    return cmd + ["--report_to", "none", "--calibration_batches", "1", *extra]


@pytest.mark.slow  # two training processes side by side: 30 s on a busy 2-core machine
def test_two_runs_started_at_once_into_one_folder(base, data, tmp_path):
    out = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            _script_cmd(base, data, out, "--max_train_steps", "4", "--seed", str(seed)),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (0, 1)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, [err[-2000:] for _, err in results]
    refused = next(err for code, err in results if code != 0).strip().splitlines()[-1]
    assert refused.startswith(f"train_text_to_image.py: error: --output_dir {out}"), refused
    assert "is in use by another run (pid" in refused or "already holds files" in refused, refused
    # the winner's outputs alone: each step logged once, one export
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4]
    assert not (out / LOCK_FILE).exists()


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until it is killed."""
    code = (
        "import sys\n"
        "from reslora_diffusers.utils.lock import folder_lock\n"
        "with folder_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow
def test_a_locked_folder_is_refused_naming_the_owner_and_a_dead_owner_is_taken_over(
    base, data, tmp_path, caplog
):
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        message = error(base, data, out, *STEPS)
        host = socket.gethostname()
        assert f"--output_dir {out} is in use by another run (pid {holder.pid} on host {host}" in message
        assert not (out / "train_log.jsonl").exists()
        message = error(base, data, out, *STEPS, "--resume_from_checkpoint", "latest")
        assert f"is in use by another run (pid {holder.pid} on host {host}" in message
    finally:
        holder.kill()  # kill -9: the lock file stays, naming a process that is gone
        holder.wait()
    assert (out / LOCK_FILE).exists()
    with caplog.at_level(logging.WARNING):
        run(base, data, out, *STEPS)
    assert f"taking over the lock of pid {holder.pid} on host {host}" in caplog.text
    assert [r["step"] for r in records(out)] == [1, 2] and not (out / LOCK_FILE).exists()


# -- 3. a checkpoint without run.json under another --res_type ----------------------------------


@pytest.mark.slow
def test_a_checkpoint_without_run_record_is_checked_against_its_stored_config(base, data, tmp_path):
    out = tmp_path / "run"
    run(base, data, out, "--max_train_steps", "1", "--checkpointing_steps", "1")
    (out / "checkpoint-1" / "run.json").unlink()  # as an older version wrote it
    resume = ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"]
    message = error(base, data, out, *resume, "--res_type", "bs")
    assert "checkpoint-1 belongs to a run with --res_type ms, this run has --res_type bs" in message
    message = error(base, data, out, *resume, "--lora_alpha", "16")
    assert "--lora_alpha 8.0, this run has --lora_alpha 16.0" in message
    run(base, data, out, *resume)  # the same flags continue
    assert [r["step"] for r in records(out)] == [1, 2]


# -- 4. a resume at or past --max_train_steps ------------------------------------------------


@pytest.mark.slow
def test_resume_at_or_past_max_train_steps(base, data, tmp_path):
    full = tmp_path / "full"
    run(base, data, full, "--max_train_steps", "3", "--checkpointing_steps", "2")
    resumed = from_checkpoint(full, 2, tmp_path / "resumed")
    # as a run killed after its last checkpoint, before the export, leaves its log
    log = "".join(line + "\n" for line in (full / "train_log.jsonl").read_text().splitlines()[:2])
    (resumed / "train_log.jsonl").write_text(log)
    message = error(base, data, resumed, "--max_train_steps", "1", "--resume_from_checkpoint", "latest")
    assert f"{resumed / 'checkpoint-2'} is at step 2, past --max_train_steps 1" in message
    assert "--max_train_steps 2 to export it as it is" in message
    assert sorted(p.name for p in resumed.iterdir()) == ["checkpoint-2", "train_log.jsonl"]

    # at exactly its step: nothing is trained, the checkpoint is exported as it is
    summary = run(base, data, resumed, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    assert summary["steps"] == 2
    assert [r["step"] for r in records(resumed)] == [1, 2]
    saved = load_file(full / "checkpoint-2" / "reslora_checkpoint.safetensors")
    exported = load_file(resumed / "reslora_checkpoint.safetensors")
    assert saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)
    assert "| steps | 2 (" in (resumed / "README.md").read_text()


# -- 5. a log torn by a crash --------------------------------------------------------------


@pytest.mark.slow
def test_a_torn_last_log_line_is_dropped_and_a_broken_one_is_named(base, data, tmp_path, caplog):
    out = tmp_path / "run"
    run(base, data, out, "--max_train_steps", "3", "--checkpointing_steps", "2")
    log = out / "train_log.jsonl"
    lines = log.read_text().splitlines()
    assert len(lines) == 3
    # killed in the middle of writing step 3's line
    log.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2])
    with caplog.at_level(logging.WARNING):
        run(base, data, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert f"{log}: dropped its last line 3" in caplog.text
    assert [r["step"] for r in records(out)] == [1, 2, 3]

    log.write_text(lines[0][:10] + "\n" + "\n".join(lines[1:]) + "\n")  # damaged inside: named
    message = error(base, data, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert f"{log} line 1 is not a training log record" in message


# -- 6. a full disk ------------------------------------------------------------------------


def test_a_full_disk_stops_the_run_naming_the_file_and_the_space(base, data, tmp_path):
    with tmpfs(tmp_path / "small", size="8m") as vol:
        out = vol / "run"
        fill(vol, leave=1 << 20)  # 1 MiB: the log fits, a 2 MB checkpoint does not
        message = error(base, data, out, *STEPS)
        assert f"{out / 'checkpoint-1'}: not enough disk space: writing it needs" in message, message
        assert "MB free" in message
        assert sorted(p.name for p in out.iterdir()) == ["train_log.jsonl"]  # no partial checkpoint


def test_a_write_failing_for_space_midway_is_one_line_and_leaves_no_partial_checkpoint(
    base, data, tmp_path, monkeypatch
):
    """accelerate writes the optimizer state with torch.save: on a full disk it fails there."""
    import accelerate.checkpointing

    real_save = accelerate.checkpointing.save

    def full_disk_save(obj, f, *args, **kwargs):
        if Path(f).name == "optimizer.bin":
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", full_disk_save)
    out = tmp_path / "run"
    message = error(base, data, out, *STEPS)
    assert f"{out / 'checkpoint-1' / 'optimizer.bin'}: the disk is full: writing it needs" in message, message
    assert not (out / "checkpoint-1").exists()
    _no_temporaries(out)


def test_a_full_disk_in_a_small_write_is_one_line_naming_it(base, data, tmp_path, monkeypatch):
    real_open = Path.open

    def full_disk_open(self, mode="r", *args, **kwargs):
        if self.name == "train_log.jsonl" and mode == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_disk_open)
    out = tmp_path / "run"
    message = error(base, data, out, *STEPS)
    assert message.endswith(f"error: {out / 'train_log.jsonl'}: No space left on device"), message


# -- 9. messages ---------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_from_a_bare_checkpoint_name_looks_in_the_output_dir(base, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(base, data, out, "--max_train_steps", "1", "--checkpointing_steps", "1")
    monkeypatch.chdir(tmp_path)  # not the output folder: diffusers' form is relative to it
    run(base, data, out, "--max_train_steps", "2", "--resume_from_checkpoint", "checkpoint-1")
    assert [r["step"] for r in records(out)] == [1, 2]
    message = error(base, data, out, "--max_train_steps", "3", "--resume_from_checkpoint", "checkpoint-7")
    assert f"{out / 'checkpoint-7'} nor checkpoint-7 does not exist" in message


def test_a_file_as_base_is_named_as_a_file(data, tmp_path):
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"\0" * 16)
    message = error(a_file, data, tmp_path / "out")
    assert (
        f"--pretrained_model_name_or_path: {a_file} is a file; give the diffusers pipeline folder" in message
    )
