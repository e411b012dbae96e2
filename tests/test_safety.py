"""Never lose or mix a user's files, never pass broken weights as good: reslora-merge into used
folders, NaN weights, damaged checkpoint files, file permissions, folders on another filesystem,
folders another process writes, full disks."""

from __future__ import annotations

import math
import os
import stat
import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

from reslora_diffusers import (
    ResLoRAConfig,
    add_reslora,
    export_lora,
    merge_to_lora,
    save_reslora_checkpoint,
    trainable_parameters,
)
from reslora_diffusers.cli import merge_main
from reslora_diffusers.utils.io import DiskFullError, atomic_dir, atomic_path
from reslora_diffusers.utils.lock import LOCK_FILE
from tests.tiny_pipes import tiny_sd_pipeline, unet_inputs
from tests.toys import randomize_lora


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base pipeline folder and a trained-looking bs ResLoRA checkpoint of its UNet."""
    tmp = tmp_path_factory.mktemp("merge")
    base_dir = tmp / "base"
    tiny_sd_pipeline(tmp).save_pretrained(str(base_dir))
    pipe = DiffusionPipeline.from_pretrained(str(base_dir))
    add_reslora(pipe, ResLoRAConfig(rank=2, res_type="bs"), train_text_encoder=False)
    randomize_lora(pipe.unet, scale=0.1)
    with torch.no_grad():
        pipe.unet.train()(**unet_inputs(pipe.unet))  # traces the chains
    ckpt = save_reslora_checkpoint({"unet": pipe.unet}, tmp / "reslora.safetensors")
    return {"base": base_dir, "ckpt": ckpt, "unet": pipe.unet, "tmp": tmp}


def _merge(saved, out, *extra: str, ckpt=None) -> int:
    return merge_main(
        [str(ckpt or saved["ckpt"]), "--base", str(saved["base"]), "--output", str(out), *extra]
    )


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("reslora-merge: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_merge_into_a_used_folder_is_refused_and_overwrite_keeps_other_files(saved, tmp_path, capsys):
    out = tmp_path / "merged"
    assert _merge(saved, out) == 0
    first = (out / "pytorch_lora_weights.safetensors").read_bytes()
    (out / "fused_pipeline").mkdir()
    (out / "fused_pipeline" / "notes.txt").write_text("mine")
    capsys.readouterr()

    assert _merge(saved, out, "--format", "kohya") == 2
    assert f"--output {out} already holds files" in _one_error_line(capsys)
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == first

    assert _merge(saved, out, "--format", "kohya", "--fuse", "--overwrite") == 0
    names = {p.name for p in out.iterdir()}
    # the diffusers file of the earlier merge is not left beside this merge's kohya file
    assert names == {"lora_kohya.safetensors", "merge_report.json", "fused_pipeline"}
    assert (out / "fused_pipeline" / "notes.txt").read_text() == "mine"
    assert (out / "fused_pipeline" / "model_index.json").is_file()


def test_merge_rank_must_be_positive(saved, tmp_path, capsys):
    for rank in ("0", "-1"):
        assert _merge(saved, tmp_path / f"r{rank}", "--rank", rank) == 2
        assert f"--rank {rank} must be > 0" in _one_error_line(capsys)
        assert not (tmp_path / f"r{rank}").exists()


def test_damaged_checkpoints_and_metadata_are_named(saved, tmp_path, capsys):
    data = saved["ckpt"].read_bytes()
    truncated, random_bytes = tmp_path / "truncated.safetensors", tmp_path / "random.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    random_bytes.write_bytes(os.urandom(4096))
    for bad in (truncated, random_bytes):
        assert _merge(saved, tmp_path / "out", ckpt=bad) == 2
        assert str(bad) in _one_error_line(capsys)

    tensors = load_file(saved["ckpt"])
    broken = tmp_path / "broken_meta.safetensors"
    save_file(tensors, str(broken), metadata={"format": "reslora-checkpoint", "configs": "{not json"})
    assert _merge(saved, tmp_path / "out", ckpt=broken) == 2
    err = _one_error_line(capsys)
    assert str(broken) in err and "metadata field 'configs' is not valid JSON" in err
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_refused_by_merge_and_export_and_never_reported_as_exact(saved, tmp_path, capsys):
    from safetensors import safe_open

    tensors = load_file(saved["ckpt"])
    key = sorted(k for k in tensors if k.endswith(".lora_B"))[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    with safe_open(str(saved["ckpt"]), framework="pt") as f:
        meta = f.metadata()
    nan_ckpt = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan_ckpt), metadata=meta)
    assert _merge(saved, tmp_path / "out", ckpt=nan_ckpt) == 2
    err = _one_error_line(capsys)
    assert f"tensor {key!r} holds NaN or infinite values" in err and str(nan_ckpt) in err
    assert not (tmp_path / "out").exists()

    unet = saved["unet"]
    param = trainable_parameters(unet)[0]
    kept = param.detach().clone()
    try:
        with torch.no_grad():
            param.fill_(float("nan"))
        merged = merge_to_lora(unet, "weight", eval_inputs=[unet_inputs(unet)])
        assert math.isnan(merged.report.output_error)  # a NaN output is not a perfect merge
        with pytest.raises(ValueError, match="holds NaN or infinite values"):
            export_lora(tmp_path / "export", unet=unet)
        assert not (tmp_path / "export").exists()
    finally:
        with torch.no_grad():
            param.copy_(kept)


def test_outputs_get_the_umask_permissions(saved, tmp_path):
    old = os.umask(0o027)
    try:
        path = save_reslora_checkpoint({"unet": saved["unet"]}, tmp_path / "ckpt.safetensors")
        export_lora(tmp_path / "export", unet=saved["unet"], formats=("diffusers",))
    finally:
        os.umask(old)
    for made in (path, tmp_path / "export" / "pytorch_lora_weights.safetensors"):
        assert stat.S_IMODE(made.stat().st_mode) == 0o640, made


def test_interrupted_writes_are_cleaned_and_folders_are_merged_not_replaced(tmp_path):
    from reslora_diffusers.utils.io import remove_stale_temporaries

    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "user.txt").write_text("mine")
    with atomic_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
    assert sorted(p.name for p in (out / "sub").iterdir()) == ["new.txt", "user.txt"]

    stale_dir = tmp_path / ".out.k3j2.tmp"  # a killed export's folder beside the output
    stale_dir.mkdir()
    stale_file = out / ".pytorch_lora_weights.safetensors.x1.tmp"
    stale_file.write_bytes(b"partial")
    removed = remove_stale_temporaries(out)
    assert set(removed) == {stale_dir, stale_file} and not stale_dir.exists() and not stale_file.exists()
    assert (out / "sub" / "user.txt").is_file()


# -- output folders on another filesystem ---------------------------------------------------


@pytest.mark.slow
def test_exports_into_a_mount_point_never_rename_across_it(saved, tmp_path, monkeypatch, capsys):
    """A folder that is a mount point: its temporary files must be made inside it (renames out
    of the parent fail with EXDEV); a sub-folder that is itself a mount is crossed by copying to
    a temporary name on its side, then renaming."""
    from tests.mounts import simulate_mount

    out = tmp_path / "volume"
    out.mkdir()
    refused = simulate_mount(monkeypatch, out)
    export_lora(out / "export", unet=saved["unet"], formats=("diffusers",))
    assert _merge(saved, out / "merged", "--fuse") == 0, capsys.readouterr().err
    export_lora(out, unet=saved["unet"], formats=("diffusers",))  # the mount point itself
    assert refused == []
    assert (out / "merged" / "fused_pipeline" / "model_index.json").is_file()
    assert (out / "pytorch_lora_weights.safetensors").is_file()

    inner = tmp_path / "run"
    (inner / "validation").mkdir(parents=True)
    monkeypatch.undo()
    refused = simulate_mount(monkeypatch, inner / "validation")
    (inner / "validation" / "old.png").write_bytes(b"old")
    with atomic_dir(inner) as tmp:
        (tmp / "validation").mkdir()
        (tmp / "validation" / "final.png").write_bytes(b"new")
        (tmp / "log.txt").write_text("done")
    assert refused and all(".tmp" in src for src, _ in refused)  # tried, then copied
    assert (inner / "validation" / "final.png").read_bytes() == b"new"
    assert (inner / "validation" / "old.png").read_bytes() == b"old"
    assert sorted(p.name for p in inner.iterdir()) == ["log.txt", "validation"]
    assert sorted(p.name for p in (inner / "validation").iterdir()) == ["final.png", "old.png"]


def test_a_failed_export_leaves_no_folder_it_created(saved, tmp_path):
    unet = saved["unet"]
    param = trainable_parameters(unet)[0]
    kept = param.detach().clone()
    try:
        with torch.no_grad():
            param.fill_(float("nan"))
        with pytest.raises(ValueError, match="holds NaN"):
            export_lora(tmp_path / "a" / "b", unet=unet)
    finally:
        with torch.no_grad():
            param.copy_(kept)
    assert list(tmp_path.iterdir()) == []


# -- one writer per folder ------------------------------------------------------------------


def test_merge_into_a_folder_another_process_writes_is_refused(saved, tmp_path, capsys, caplog):
    import json
    import socket

    out = tmp_path / "merged"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "build-7", "started": "2026-12-05 08:00:00"}))
    assert _merge(saved, out) == 2
    err = _one_error_line(capsys)
    assert f"--output {out} is in use by another run (pid 1 on host build-7" in err
    assert f"delete {out / LOCK_FILE}" in err  # another host's process cannot be checked from here
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]

    # a process of this host that is gone: its lock is taken over
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    record = {"pid": gone.pid, "host": socket.gethostname(), "started": "2026-12-05 08:00:00"}
    (out / LOCK_FILE).write_text(json.dumps(record))
    with caplog.at_level("WARNING"):
        assert _merge(saved, out) == 0
    assert f"taking over the lock of pid {gone.pid} on host {socket.gethostname()}" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [
        "lora_kohya.safetensors",
        "merge_report.json",
        "pytorch_lora_weights.safetensors",
    ]


def test_of_processes_starting_at_once_one_holds_the_lock(tmp_path):
    """Eight starts at once, into a free folder and into one with a stale lock: exactly one
    holds it and the others are refused naming it (several finding the same stale lock must
    not each remove it: the later would remove the lock a faster one had taken meanwhile)."""
    import json
    import socket
    import threading
    import time

    from reslora_diffusers.utils.lock import FolderInUseError, folder_lock

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for stale in (False, True):
        folder = tmp_path / f"stale-{stale}"
        folder.mkdir()
        if stale:
            (folder / LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
        start, release, outcomes = threading.Barrier(8), threading.Event(), []

        def attempt(folder=folder, start=start, release=release, outcomes=outcomes):
            start.wait()
            try:
                with folder_lock(folder):
                    outcomes.append("held")
                    release.wait(30)
            except FolderInUseError as err:
                outcomes.append(str(err))

        threads = [threading.Thread(target=attempt) for _ in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while sum(o != "held" for o in outcomes) < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        for t in threads:
            t.join()
        assert outcomes.count("held") == 1, outcomes
        assert all("is in use by another run" in o for o in outcomes if o != "held"), outcomes
        assert list(folder.iterdir()) == []


# -- a full disk ---------------------------------------------------------------------------


def test_a_full_disk_is_one_line_naming_the_file_and_the_space(saved, tmp_path, capsys):
    from tests.mounts import fill, tmpfs

    with tmpfs(tmp_path / "small", size="16m") as vol:
        fill(vol, leave=2 << 20)
        assert _merge(saved, vol / "merged", "--fuse") == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        err = err.strip().splitlines()[-1]  # after diffusers' loading bars
        assert err.startswith("reslora-merge: error: "), err
        assert f"{vol / 'merged'}: not enough disk space: writing it needs" in err and "MB free" in err
        assert sorted(p.name for p in vol.iterdir()) == ["filler.bin"]

        # a write that finds out only by failing (torch's writer: "unexpected pos ...")
        fill(vol, leave=256 << 10)
        target = vol / "state.bin"
        with pytest.raises(DiskFullError, match=f"{target}: the disk is full: writing it needs more than"):
            with atomic_path(target) as tmp:
                torch.save({"w": torch.zeros(1 << 20)}, tmp)
        assert sorted(p.name for p in vol.iterdir()) == ["filler.bin"]


def test_a_safetensors_write_failing_for_space_names_the_file(saved, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import reslora_diffusers.core.checkpoint as checkpoint_module

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    target = tmp_path / "ckpt.safetensors"
    with pytest.raises(
        DiskFullError, match=f"{target}: the disk is full: writing it needs .* MB, .* MB free"
    ):
        save_reslora_checkpoint({"unet": saved["unet"]}, target)
    assert list(tmp_path.iterdir()) == []
