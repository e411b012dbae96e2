"""train_text_to_image.py: a tiny end-to-end run, exact resume, bad-input errors, 2-process DDP.

The base is a random tiny pipeline built by ``reslora_diffusers.data.build_pipeline``; the
data is the first images of the embedded fine-tuning set.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from reslora_diffusers import chain_structure, load_reslora_checkpoint
from reslora_diffusers.frontends import DEFAULT_UNET_TARGETS
from reslora_diffusers.training.data import load_image_captions, open_image
from tests.runs import (
    PROMPT,
    ROOT,
    SCRIPT,
    assert_same_weights,
    error,
    from_checkpoint,
    launch_two_processes,
    records,
    run,
    script,
)

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


def _unet_inputs(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2, 4, 16, 16, generator=gen),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 16, 64, generator=gen),
    }


@pytest.mark.slow
def test_tiny_run_writes_every_output_and_a_loadable_lora(base, data, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "run"
    extra = ["--max_train_steps", "3", "--res_type", "bs", "--validation_prompt", PROMPT]
    extra += ["--num_validation_images", "1", "--validation_steps", "2", "--checkpointing_steps", "2"]
    summary = run(base, data, out, *extra, "--report_to", "tensorboard")

    for name in (
        "pytorch_lora_weights.safetensors",
        "lora_kohya.safetensors",
        "merge_report.json",
        "reslora_checkpoint.safetensors",
        "README.md",
        "checkpoint-2/reslora_checkpoint.safetensors",
        "validation/step-000000.png",
        "validation/step-000002.png",
        "validation/final.png",
    ):
        assert (out / name).is_file(), name
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all({"lr", "time"} <= set(r) for r in steps)
    assert [r["step"] for r in records if r.get("kind") == "validation"] == [0, 2]
    assert summary["prompt_accuracy_before"] is not None and summary["prompt_accuracy_after"] is not None
    card = (out / "README.md").read_text()
    assert str(base) in card and "ResLoRA `bs`" in card and "prompt accuracy" in card and "final.png" in card
    assert json.loads((out / "merge_report.json").read_text())["components"]["unet"]["eval_inputs"] == "given"

    # the diffusers file loads with load_lora_weights and gives the trained ResLoRA model (bs merges exactly)
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.load_lora_weights(out)
    reslora_unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    load_reslora_checkpoint({"unet": reslora_unet}, out / "reslora_checkpoint.safetensors")
    plain = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    with torch.no_grad():
        loaded, trained = pipe.unet(**_unet_inputs()).sample, reslora_unet(**_unet_inputs()).sample
        untouched = plain(**_unet_inputs()).sample
    assert (loaded - untouched).abs().max() > 0
    assert (loaded - trained).norm() / trained.norm() < 1e-4


@pytest.mark.slow
def test_resume_from_checkpoint_matches_uninterrupted_run(base, data, tmp_path):
    # 8 images in batches of 3: 3 steps per epoch; the checkpoint at step 2 is mid-epoch and
    # the resumed run crosses an epoch boundary. Flip, dropout and `is` norm windows use state.
    extra = [
        "--max_train_steps",
        "5",
        "--checkpointing_steps",
        "2",
        "--res_type",
        "is",
        "--random_flip",
        "--lora_dropout",
        "0.1",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "2",
    ]
    run(base, data, tmp_path / "full", *extra)
    resumed = from_checkpoint(tmp_path / "full", 2, tmp_path / "resumed")
    run(base, data, resumed, *extra, "--resume_from_checkpoint", "latest")

    full = assert_same_weights(tmp_path / "full", resumed)
    assert any(v.abs().sum() > 0 for k, v in full.items() if k.endswith("lora_B"))
    losses = [json.loads(line) for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    full_losses = [
        json.loads(line) for line in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()
    ]
    assert [r["loss"] for r in losses] == [r["loss"] for r in full_losses if r["step"] > 2]


@pytest.mark.slow
def test_resume_mid_decay_of_the_shortcut_schedule_is_exact_and_exports_exactly(base, data, tmp_path):
    """A cosine schedule from step 1 of 5: the checkpoint at step 3 is mid-decay (c = 0.5); the
    resumed run ends with the same weights and c = 0, where the `is` merge is exact."""
    extra = ["--max_train_steps", "5", "--checkpointing_steps", "3", "--res_type", "is"]
    extra += ["--shortcut_schedule", "cosine", "--shortcut_decay_start", "0.2", "--lora_dropout", "0.1"]
    run(base, data, tmp_path / "full", *extra)
    mid = load_file(tmp_path / "full" / "checkpoint-3" / "reslora_checkpoint.safetensors")
    scales = {float(v) for k, v in mid.items() if k.endswith("shortcut_scale")}
    assert len(scales) == 1 and scales.pop() == pytest.approx(
        0.5
    )  # step 3: p = (3 - 1) / 4, (1 + cos(pi / 2)) / 2
    resumed = from_checkpoint(tmp_path / "full", 3, tmp_path / "resumed")
    run(base, data, resumed, *extra, "--resume_from_checkpoint", "latest")

    full = assert_same_weights(tmp_path / "full", resumed)
    assert {float(v) for k, v in full.items() if k.endswith("shortcut_scale")} == {0.0}
    losses = [json.loads(line)["loss"] for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    full_log = (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()
    assert losses == [json.loads(line)["loss"] for line in full_log[3:]]
    report = json.loads((resumed / "merge_report.json").read_text())
    assert report["components"]["unet"]["output_error"] < 1e-5
    # a resume under another schedule is another run
    message = error(
        base,
        data,
        resumed,
        "--res_type",
        "is",
        "--shortcut_schedule",
        "constant",
        "--resume_from_checkpoint",
        "latest",
    )
    assert "--shortcut_schedule cosine" in message


def test_bad_inputs_give_one_line_naming_the_problem(base, data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    missing = tmp_path / "nowhere"
    cases = [
        (["--resolution", "30"], "--resolution 30"),
        (["--calibration_batches", "0"], "--calibration_batches 0"),
        (["--caption_column", "caption"], "--caption_column 'caption'"),
        (["--image_column", "picture"], "--image_column 'picture'"),
        (["--train_data_dir", str(empty)], f"no images in {empty}"),
        (["--train_data_dir", str(missing)], f"{missing} does not exist"),
        (["--pretrained_model_name_or_path", str(missing)], f"{missing} does not exist"),
        (["--resume_from_checkpoint", str(missing)], f"{missing} does not exist"),
        (["--target_modules", "to_q", "to_qq"], "--target_modules: 'to_qq'"),
        (["--pre_num", "0"], "--pre_num 0 must be >= 1 for --res_type ms"),
        (["--use_peft", "--shortcut_schedule", "cosine"], "PEFT LoRA (--use_peft) has no shortcuts"),
    ]
    for extra, expected in cases:
        assert expected in error(base, data, tmp_path / "out", *extra), extra


@pytest.mark.parametrize(
    "extra, res_type, schedule",
    [
        ([], "ms", "cosine"),  # the default: ms whose shortcuts decay to an exact export
        (["--res_type", "bs"], "bs", "cosine"),
        (["--res_type", "is", "--shortcut_schedule", "constant"], "is", "constant"),
        (["--res_type", "none"], "none", "constant"),  # no shortcut to decay
        (["--use_peft"], "none", "constant"),
    ],
)
def test_default_method_and_shortcut_schedule(data, extra, res_type, schedule):
    args = script.parse_args(["--train_data_dir", str(data), *extra])
    script.check_args(args)
    assert (args.res_type, args.pre_num, args.merge) == (res_type, 1, "calibrated")
    assert (args.shortcut_schedule, args.shortcut_decay_start) == (schedule, 0.5)


@pytest.mark.parametrize(
    "extra, warned",
    [
        (["--lr_scheduler", "cosine"], True),  # the default ms-cosine under a falling rate
        (["--lr_scheduler", "linear", "--res_type", "bs"], True),  # bs's shortcuts fade by default too
        (["--lr_scheduler", "cosine", "--res_type", "bs", "--shortcut_schedule", "constant"], False),
        (["--lr_scheduler", "cosine", "--use_peft"], False),
        (["--lr_scheduler", "constant_with_warmup"], False),
        ([], False),
    ],
)
def test_fading_shortcuts_under_a_falling_rate_are_warned_of(data, caplog, extra, warned):
    args = script.parse_args(["--train_data_dir", str(data), *extra])
    with caplog.at_level(logging.WARNING, logger=script.logger.name):
        script.check_args(args)
    messages = [r.getMessage() for r in caplog.records if "fades the shortcuts" in r.getMessage()]
    assert len(messages) == int(warned), extra
    if warned:
        assert f"--lr_scheduler {args.lr_scheduler} lowers the rate" in messages[0]
        assert "--res_type bs --shortcut_schedule constant" in messages[0]


def test_tensorboard_is_an_extra_its_default_falls_back_and_naming_it_without_it_is_refused(
    data, monkeypatch, caplog
):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a),
    )
    argv = ["--train_data_dir", str(data)]
    args = script.parse_args(argv)
    script.check_report_to(args, script.given_flags(argv))
    assert args.report_to == "none"
    assert "tensorboard is not installed" in caplog.text and "[tensorboard]" in caplog.text
    argv += ["--report_to", "tensorboard"]
    with pytest.raises(
        ValueError, match=r"--report_to tensorboard: the tensorboard package is not installed"
    ):
        script.check_report_to(script.parse_args(argv), script.given_flags(argv))
    monkeypatch.undo()  # installed: the flag stays
    args = script.parse_args(argv)
    script.check_report_to(args, script.given_flags(argv))
    assert args.report_to == "tensorboard"


def test_unusable_output_dir_is_refused_before_anything_loads(data, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    nowhere = tmp_path / "no_base"  # loading it would fail: the output error must come first
    for out in (a_file, a_file / "run"):
        message = error(nowhere, data, out)
        assert f"--output_dir {out} cannot be a folder" in message, message
    assert a_file.read_text() == "not a folder"
    finished = tmp_path / "finished"  # a run without checkpoints: "latest" has nothing to continue
    finished.mkdir()
    (finished / "train_log.jsonl").write_text("")
    message = error(nowhere, data, finished, "--resume_from_checkpoint", "latest")
    assert "holds files but no checkpoint-<step> folder" in message, message


@pytest.mark.slow
def test_rerun_into_a_used_folder_is_refused_and_overwrite_replaces_only_the_run(base, data, tmp_path):
    out = tmp_path / "run"
    run(base, data, out, "--max_train_steps", "2", "--checkpointing_steps", "1")
    (out / "notes.txt").write_text("mine")
    before = (out / "train_log.jsonl").read_text()

    message = error(base, data, out, "--max_train_steps", "1")
    assert f"--output_dir {out} already holds files" in message and "--overwrite_output_dir" in message
    assert (out / "train_log.jsonl").read_text() == before  # untouched

    # a resume under flags that make another model is refused, naming the flag
    message = error(base, data, out, "--res_type", "none", "--resume_from_checkpoint", "latest")
    assert "checkpoint-2 belongs to a run with --res_type ms, this run has --res_type none" in message
    message = error(base, data, out, "--rank", "4", "--resume_from_checkpoint", str(out / "checkpoint-1"))
    assert "--rank 8, this run has --rank 4" in message

    run(base, data, out, "--max_train_steps", "1", "--checkpointing_steps", "1", "--overwrite_output_dir")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # the old step 2 is gone
    assert [r["step"] for r in records(out)] == [1]
    assert (out / "notes.txt").read_text() == "mine"


def test_non_finite_loss_stops_the_run_naming_the_step_and_last_good_checkpoint(base, data, tmp_path):
    out = tmp_path / "diverged"
    extra = ["--learning_rate", "1e8", "--max_grad_norm", "0", "--max_train_steps", "6"]
    message = error(base, data, out, *extra, "--checkpointing_steps", "1", "--train_batch_size", "3")
    assert "the training loss is nan" in message or "the trained weights are not finite" in message, message
    step = int(message.split("error: step ")[1].split(":")[0])
    saved = sorted(out.glob("checkpoint-*"))
    assert (f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved") in message
    for folder in saved:  # no checkpoint holds NaN weights
        weights = load_file(folder / "reslora_checkpoint.safetensors")
        assert all(torch.isfinite(v).all() for v in weights.values())
    assert all(r["step"] < step and np.isfinite(r["loss"]) for r in records(out))
    assert not (out / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.slow
def test_damaged_or_incomplete_checkpoints_are_named_on_resume(base, data, tmp_path):
    out = tmp_path / "run"
    run(base, data, out, "--max_train_steps", "1", "--checkpointing_steps", "1")
    ckpt = out / "checkpoint-1"
    saved = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    def resume_error(*extra: str) -> str:
        return error(base, data, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest", *extra)

    for name in ("reslora_checkpoint.safetensors", "optimizer.bin"):
        (ckpt / name).write_bytes(saved[name][: len(saved[name]) // 2])
        assert str(ckpt / name) in resume_error(), name
        (ckpt / name).write_bytes(saved[name])
    (ckpt / "random_states_0.pkl").unlink()
    message = resume_error()
    assert str(ckpt / "random_states_0.pkl") in message and "--allow_partial_resume" in message
    run(
        base,
        data,
        out,
        "--max_train_steps",
        "2",
        "--resume_from_checkpoint",
        "latest",
        "--allow_partial_resume",
    )
    assert [r["step"] for r in records(out)] == [1, 2]


def test_metadata_rows_naming_missing_or_outside_files_are_named(data, tmp_path):
    folder = tmp_path / "set"
    shutil.copytree(data, folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / rows[2]["file_name"]).unlink()  # an image with no row would be an image with no caption
    rows[2]["file_name"] = "gone.png"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_image_captions(None, folder, "image", "text")
    assert loaded.skipped == 1 and len(loaded.sources) == len(rows) - 1
    rows[2]["file_name"] = "../outside.png"
    shutil.copy(
        data / json.loads((data / "metadata.jsonl").read_text().splitlines()[0])["file_name"],
        tmp_path / "outside.png",
    )
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="metadata.jsonl row 3: file_name '../outside.png' points outside"):
        load_image_captions(None, folder, "image", "text")


def test_corrupt_images_are_skipped_and_counted(data, tmp_path):
    folder = tmp_path / "set"
    shutil.copytree(data, folder)
    first = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    (folder / first).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    loaded = load_image_captions(None, folder, "image", "text")
    assert loaded.skipped == 1 and len(loaded.sources) == 7
    for path in folder.glob("*.png"):
        path.write_bytes(b"broken")
    with pytest.raises(ValueError, match="no readable images in folder .* \\(8 corrupt\\)"):
        load_image_captions(None, folder, "image", "text")


@pytest.mark.slow
def test_two_process_ddp_run_and_exact_resume(base, data, tmp_path):
    """2 CPU processes (gloo DDP): the run completes, both ranks checkpoint their RNG, the
    result has the single-process chain structure, finite trained weights and an accurate
    merge; a 2-process run resumed from the step-2 checkpoint ends with the same weights."""
    from diffusers import UNet2DConditionModel

    from reslora_diffusers import ResLoRAConfig, add_reslora

    out = tmp_path / "ddp"
    result = launch_two_processes(base, data, out)
    assert "process 0 of 2 on cpu" in result.stderr and "process 1 of 2 on cpu" in result.stderr
    assert {p.name for p in (out / "checkpoint-2").glob("random_states_*")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    weights = load_file(out / "reslora_checkpoint.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.endswith("lora_B"))
    with safe_open(str(out / "reslora_checkpoint.safetensors"), framework="pt") as f:
        ddp_chains = json.loads(f.metadata()["chains"])["unet"]
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    add_reslora(unet, ResLoRAConfig(rank=4, res_type="ms", target_modules=DEFAULT_UNET_TARGETS))
    with torch.no_grad():
        unet(**_unet_inputs())
    single = {k: {"modules": v["modules"], "links": v["links"]} for k, v in chain_structure(unet).items()}
    assert ddp_chains == single
    report = json.loads((out / "merge_report.json").read_text())
    assert report["components"]["unet"]["output_error"] < 0.05

    resumed = from_checkpoint(out, 2, tmp_path / "resumed")
    launch_two_processes(base, data, resumed, "--resume_from_checkpoint", "latest")
    assert_same_weights(out, resumed)


def _as_hub_dataset(data: Path, root: Path) -> tuple[Path, Path]:
    """The image folder as a hub-style parquet repo (``data/train-*.parquet``, images embedded)
    and as a ``Dataset.save_to_disk`` folder, with the captions in a column named ``caption``."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    lines = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    dataset = Dataset.from_dict(
        {"image": [str(data / r["file_name"]) for r in lines], "caption": [r["text"] for r in lines]}
    ).cast_column("image", ImageFeature())
    parquet, saved = root / "parquet-repo", root / "saved"
    (parquet / "data").mkdir(parents=True)
    dataset.to_parquet(str(parquet / "data" / "train-00000-of-00001.parquet"))
    dataset.save_to_disk(str(saved))
    return parquet, saved


def test_local_dataset_folders_load_like_the_image_folder(data, tmp_path, monkeypatch):
    parquet, saved = _as_hub_dataset(data, tmp_path)
    folder = load_image_captions(None, data, "image", "text")
    monkeypatch.setenv("HOME", str(tmp_path))
    for path in (parquet, saved, "~/saved"):
        loaded = load_image_captions(str(path), None, "image", "caption")
        assert loaded.captions == folder.captions, path
        for got, expected in zip(loaded.sources, folder.sources, strict=True):
            assert np.array_equal(np.asarray(open_image(got)), np.asarray(open_image(expected))), path
    with pytest.raises(ValueError, match="--caption_column 'text' is not a column of dataset .*saved"):
        load_image_captions(str(saved), None, "image", "text")


@pytest.mark.slow
def test_peft_baseline_on_unet_and_text_encoder_from_a_hub_style_dataset(base, data, tmp_path):
    """--use_peft --train_text_encoder: diffusers' own LoRA, saved with its own writer; every
    targeted layer is in the file, trained, and changes the pipeline that loads it."""
    from diffusers import StableDiffusionPipeline

    parquet, _ = _as_hub_dataset(data, tmp_path)
    out = tmp_path / "peft"
    argv = ["--pretrained_model_name_or_path", str(base), "--dataset_name", str(parquet)]
    argv += ["--caption_column", "caption", "--output_dir", str(out), "--report_to", "none"]
    argv += ["--use_peft", "--train_text_encoder", "--max_train_steps", "3", "--train_batch_size", "3"]
    argv += ["--learning_rate", "1e-2", "--checkpointing_steps", "2", "--rank", "4", "--lora_alpha", "8"]
    summary = script.train(script.parse_args(argv), argv)

    assert summary["steps"] == 3 and "merge_error" not in summary
    assert not (out / "lora_kohya.safetensors").exists()  # written from ResLoRA merges only
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    unet_targets = [n for n, _ in pipe.unet.named_modules() if n.endswith(tuple(DEFAULT_UNET_TARGETS))]
    text_targets = [
        n
        for n, _ in pipe.text_encoder.named_modules()
        if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))
    ]
    expected = {f"unet.{n}.lora_{ab}.weight" for n in unet_targets for ab in "AB"}
    expected |= {f"text_encoder.{n}.lora_{ab}.weight" for n in text_targets for ab in "AB"}
    assert set(weights) == expected
    assert all(weights[k].abs().sum() > 0 for k in weights if ".lora_B." in k)  # PEFT starts B at 0
    assert {weights[k].shape[0] for k in weights if ".lora_A." in k} == {4}

    ids = pipe.tokenizer([PROMPT], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0], pipe.unet(**_unet_inputs()).sample
        pipe.load_lora_weights(out)
        after = pipe.text_encoder(ids)[0], pipe.unet(**_unet_inputs()).sample
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(after, before))
    # every layer of the file is loaded, with alpha / rank = 2 from the file's metadata
    layers = {
        f"{c}.{n}"
        for c in ("unet", "text_encoder")
        for n, m in getattr(pipe, c).named_modules()
        if hasattr(m, "lora_A")
    }
    assert layers == {k.rsplit(".lora_", 1)[0] for k in weights}
    assert {
        s
        for c in (pipe.unet, pipe.text_encoder)
        for m in c.modules()
        if hasattr(m, "lora_A")
        for s in m.scaling.values()
    } == {2.0}
    assert "PEFT LoRA" in (out / "README.md").read_text()

    # checkpoints hold the LoRA layers, not whole models, and resume to the same weights
    assert {p.name for p in (out / "checkpoint-2").glob("*.safetensors")} == {"peft_lora.safetensors"}
    resumed = from_checkpoint(out, 2, tmp_path / "peft-resumed")
    again = [*argv, "--resume_from_checkpoint", "latest"]
    again[again.index(str(out))] = str(resumed)
    script.train(script.parse_args(again), again)
    resumed_weights = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(resumed_weights[k], weights[k]) for k in weights)


@pytest.mark.slow
def test_text_encoder_reslora_in_bf16_exports_the_trained_text_encoder(base, data, tmp_path):
    """--train_text_encoder --mixed_precision bf16: the adapters stay float32, and the text
    encoder that load_lora_weights builds is the trained ResLoRA one (bs merges exactly)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    out = tmp_path / "te"
    extra = ["--train_text_encoder", "--mixed_precision", "bf16", "--res_type", "bs", "--pre_num", "2"]
    extra += ["--no_chain_report"]
    summary = run(base, data, out, *extra, "--max_train_steps", "3", "--learning_rate", "1e-2")
    assert summary["merge_error"]["text_encoder"] < 1e-5
    report = json.loads((out / "merge_report.json").read_text())
    assert {k for comp in report["components"].values() for r in comp["methods"].values() for k in r} == {
        "total"
    }

    trained = load_file(out / "reslora_checkpoint.safetensors")
    assert {v.dtype for k, v in trained.items() if k.endswith(("lora_A", "lora_B"))} == {torch.float32}
    assert any(
        k.startswith("text_encoder.") and k.endswith("lora_B") and v.abs().sum() > 0
        for k, v in trained.items()
    )
    with safe_open(str(out / "lora_kohya.safetensors"), framework="pt") as f:
        assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in f.keys())

    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    load_reslora_checkpoint(
        {"unet": unet, "text_encoder": text_encoder}, out / "reslora_checkpoint.safetensors"
    )
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    ids = pipe.tokenizer([PROMPT], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(out)
        expected, got = text_encoder(ids)[0], pipe.text_encoder(ids)[0]
    assert (expected - plain).abs().max() > 1e-4
    assert (got - expected).norm() / expected.norm() < 1e-5


def test_dataset_name_hub_ids_go_to_the_hub_and_missing_paths_are_named(monkeypatch):
    import datasets
    import huggingface_hub

    # no network in tests: offline mode makes the hub lookup fail at once, as it would for a typo
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="--dataset_name: could not load 'someone/no-such-set': .*Hub"):
        load_image_captions("someone/no-such-set", None, "image", "text")
    for path in ("./nowhere", "/no/such/folder", "a/b/c"):
        with pytest.raises(ValueError, match=f"--dataset_name: path {path} does not exist"):
            load_image_captions(path, None, "image", "text")


@pytest.mark.slow
def test_no_argument_run_uses_the_embedded_base_data_and_prompts(tmp_path, capfd):
    """The README's main command, cut to 2 steps and 1 image per prompt: embedded base and set,
    the 15 concept prompts (which the base cannot draw), attention + feed-forward targets; a
    console without the third-party warnings that are harmless here, with the evaluations'
    progress bars."""
    from reslora_diffusers.data import default_base_model_path, finetune_prompts

    out = tmp_path / "default"
    argv = ["--output_dir", str(out), "--max_train_steps", "2", "--num_validation_images", "1"]
    summary = script.train(script.parse_args([*argv, "--report_to", "none"]), argv)
    assert summary["prompt_accuracy_before"] == 0.0 and summary["prompt_accuracy_after"] is not None
    assert summary["merge_error"]["unet"] < 1e-5  # bs merges exactly
    card = (out / "README.md").read_text()
    assert "from_pretrained(default_base_model_path())" in card and "`ff.net.2`" in card
    assert str(default_base_model_path()) not in card  # this machine's folders mean nothing to a reader
    assert "the embedded fine-tuning set, 150 images" in card and str(ROOT) not in card
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        layers = {k.rsplit(".lora_", 1)[0] for k in f.keys()}
    suffixes = {name.split("transformer_blocks.0.")[-1] for name in layers}
    assert suffixes == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q"} | {
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
    }
    assert len(layers) == 11 * 10  # 2 x 2 down, 1 mid, 2 x 3 up transformer blocks in the tiny UNet
    grid = Image.open(out / "validation" / "final.png")
    # 32 px samples drawn 3x, with the prompts above the columns and the seed left of the row
    assert grid.width > 96 * len(finetune_prompts()) and grid.height > 96
    err = capfd.readouterr().err
    for harmless in ("kept in float32", "No LoRA keys associated", "Downloading data", "torch_dtype"):
        assert harmless not in err
    assert "validation step-000000" in err and "validation final" in err
    assert "base_model: tiny-sd\n" in card


#: console lines that say nothing to a user of the script (issue: "a user should see progress,
#: results and real problems"), each with what printed it before
NOISE = {
    "requires torchvision": "transformers, importing diffusers' pipeline modules",
    "Failed to load CPU gemm_4bit_forward": "bitsandbytes, imported by diffusers' quantizers",
    "No LoRA keys associated to": "diffusers, loading a UNet-only LoRA",
    "ResLoRA chain ": "one INFO line per chain",
    "share one A product": "the shared-input groups",
    "accelerate.": "accelerate's INFO lines for every file of every checkpoint",
    "Distributed environment": "accelerate's state, over six lines",
    "ResLoRA calibrated merge (none)": "plain LoRA called a ResLoRA merge",
    "ResLoRA none": "plain LoRA called ResLoRA when attached",
}


@pytest.mark.slow  # a fresh process: about 15 s
def test_console_shows_progress_results_and_problems_and_no_noise(base, data, tmp_path):
    """A fresh process (transformers' notices come once per process) trains plain LoRA for 4
    steps with a checkpoint every 2, on data with one corrupt image: the console has the
    progress bars, the checkpoints, the results and the warning about the image, and none of
    the lines in ``NOISE``."""
    folder = tmp_path / "data"
    shutil.copytree(data, folder)
    first = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    (folder / first).write_bytes(b"not an image")
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(base)]
    cmd += ["--train_data_dir", str(folder), "--output_dir", str(out), "--train_batch_size", "3"]
    cmd += ["--max_train_steps", "4", "--checkpointing_steps", "2", "--res_type", "none"]
    cmd += ["--validation_prompt", PROMPT, "--num_validation_images", "1", "--validation_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert not {line: why for line, why in NOISE.items() if line in console}
    # what a user should see
    assert "Steps: 100%" in console and "validation final" in console
    assert "saved " in console and "checkpoint-2" in console and "checkpoint-4" in console
    assert "WARNING" in console and "skipped 1 unreadable or corrupt image(s)" in console
    assert "INFO reslora_diffusers.export.pipeline: LoRA exported (nothing to merge): " in console
    assert "INFO reslora_diffusers.core.inject: LoRA, rank 8, on " in console
    assert "prompt accuracy before: " in done.stdout and '"steps": 4' in done.stdout
    card = (out / "README.md").read_text()
    assert "| method | LoRA (`--res_type none`), rank" in card and "ResLoRA" not in card.split("## Use")[0]


def _losses(out: Path) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r
    ]


@pytest.mark.slow  # about 50 s of dynamo tracing on an idle CPU
def test_torch_compile_trains_like_eager_and_exports_the_uncompiled_unet(base, data, tmp_path):
    """--torch_compile with dynamo's graph capture (the ``eager`` backend: inductor's code
    generation takes minutes on a CPU): the same losses and LoRA file as the eager run, and one
    graph although the default cosine schedule moves the shortcut scale from 1 to 0 between the
    two steps. With that schedule the export is the trained factors themselves; the calibrated
    merge of a constant schedule would add a least-squares solve whose solution amplifies the
    round-off between the two runs."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    extra = ["--max_train_steps", "2", "--res_type", "ms", "--pre_num", "2", "--no_chain_report"]
    run(base, data, tmp_path / "eager", *extra)
    torch._dynamo.reset()
    counters.clear()
    compiled = [*extra, "--torch_compile", "--compile_backend", "eager"]
    run(base, data, tmp_path / "compiled", *compiled)
    assert counters["stats"]["unique_graphs"] == 1 and dict(counters["graph_break"]) == {}
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-5)
    want = load_file(tmp_path / "eager" / "pytorch_lora_weights.safetensors")
    got = load_file(tmp_path / "compiled" / "pytorch_lora_weights.safetensors")
    assert set(got) == set(want) and not any("_orig_mod" in k for k in got)
    report = json.loads((tmp_path / "compiled" / "merge_report.json").read_text())
    assert report["components"]["unet"]["output_error"] < 1e-5  # the schedule ended at 0: exact
    for key in want:
        # AdamW's first steps divide by sqrt(v): a near-zero gradient entry whose round-off differs
        # between the graphs moves its weight by a few 1e-6
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_fused_adam_flag_and_its_cpu_default(base, data, tmp_path, monkeypatch):
    """No --use_fused_adam: the fused kernel only on CUDA; --use_fused_adam asks for it anywhere."""
    made = []
    real = torch.optim.AdamW

    class Recording(real):
        def __init__(self, params, **kwargs):
            made.append(kwargs.get("fused"))
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    extra = ["--max_train_steps", "1", "--res_type", "bs", "--no_chain_report"]
    run(base, data, tmp_path / "default", *extra)
    run(base, data, tmp_path / "fused", *extra, "--use_fused_adam")
    assert made == [None, True]


PRECISIONS = [
    "bf16",
    pytest.param("fp16", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", [["--res_type", "ms", "--pre_num", "2"], ["--use_peft"]])
def test_mixed_precision_keeps_the_base_in_half_and_adapters_and_optimizer_in_float32(
    base, data, tmp_path, monkeypatch, precision, method
):
    """As diffusers' LoRA scripts: the frozen UNet in bf16/fp16, the trained factors and AdamW's
    moments in float32; fp16 with accelerate's loss scaler."""
    seen = {}
    loop = script.run_training

    def recording(run, *args):
        loop(run, *args)
        unet = run.accelerator.unwrap_model(run.models["unet"])
        seen["base"] = {p.dtype for p in unet.parameters() if not p.requires_grad}
        seen["trained"] = {p.dtype for p in run.params}
        seen["moments"] = {t.dtype for s in run.optimizer.state.values() for k, t in s.items() if k != "step"}
        seen["scaler"] = run.accelerator.scaler

    monkeypatch.setattr(script, "run_training", recording)
    extra = ["--max_train_steps", "2", "--mixed_precision", precision, "--no_chain_report", *method]
    summary = run(base, data, tmp_path / "run", *extra)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert seen["base"] == {half}
    assert seen["trained"] == {torch.float32} and seen["moments"] == {torch.float32}
    assert (seen["scaler"] is not None) == (precision == "fp16")
    assert np.isfinite(summary["final_loss"])
    assert all(
        v.dtype == torch.float32
        for v in load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors").values()
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA has a loss scaler")
def test_fp16_without_a_loss_scaler_is_refused_in_one_line(base, data, tmp_path):
    with pytest.raises(ValueError, match="fp16 needs loss scaling.*use --mixed_precision bf16"):
        run(base, data, tmp_path / "run", "--max_train_steps", "1", "--mixed_precision", "fp16")
