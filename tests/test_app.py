"""The Gradio demo, driven through gradio_client and through a real headless Chromium."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from gradio_client import Client
from PIL import Image
from safetensors.torch import load_file, save_file

import app.app as demo_app
from app.app import build_app, merge_table, run_label
from reslora_diffusers import ResLoRAConfig, add_reslora, export_lora
from tests.tiny_pipes import tiny_sd_pipeline, unet_inputs
from tests.toys import randomize_lora

CHROMIUM = Path("/usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lora_run(tmp: Path, base_dir: Path, res_type: str, name: str) -> Path:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(base_dir))
    add_reslora(pipe, ResLoRAConfig(rank=2, res_type=res_type), train_text_encoder=False)
    randomize_lora(pipe.unet, scale=0.3)
    with torch.no_grad():
        pipe.unet.train()(**unet_inputs(pipe.unet))
    out = tmp / name
    export_lora(out, unet=pipe.unet, merge="weight")
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    base_dir = tmp / "base"
    tiny_sd_pipeline(tmp).save_pretrained(str(base_dir))
    runs = [_lora_run(tmp, base_dir, "none", "lora"), _lora_run(tmp, base_dir, "bs", "reslora")]
    bad = tmp / "not_a_lora.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(bad))
    demo = build_app(str(base_dir), [str(r) for r in runs])
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "base": base_dir, "runs": runs, "bad": bad, "tmp": tmp}
    finally:
        demo.close()


def _generate(client, served, loras, seed=3, num_images=2):
    return client.predict(
        "a red circle on a white background",
        "",
        seed,
        4,
        3.0,
        1.0,
        num_images,
        str(served["base"]),
        loras,
        api_name="/generate",
    )


def test_generate_endpoint_returns_labelled_images_repeatably(served):
    client = Client(served["url"], verbose=False)
    loras = "\n".join(str(r) for r in served["runs"])
    gallery, status = _generate(client, served, loras)
    assert len(gallery) == 3 * 2  # base, LoRA, ResLoRA; 2 images each
    sizes = {Image.open(item["image"]).size for item in gallery}
    assert sizes == {(16, 16)}  # tiny UNet sample 8 x VAE factor 2
    captions = [item["caption"] for item in gallery]
    assert captions[0].startswith("base | seed 3") and captions[1].startswith("base | seed 4")
    assert captions[2].startswith("LoRA (lora)") and captions[4].startswith("ResLoRA bs m=1 (reslora)")
    assert all("color" in c and "shape" in c for c in captions)
    again, _ = _generate(client, served, loras)
    pixels = [Image.open(item["image"]).tobytes() for item in gallery]
    assert pixels == [Image.open(item["image"]).tobytes() for item in again]
    assert pixels[0] != pixels[2]  # the LoRA changes the image


def test_bad_lora_file_is_reported_in_the_page(served):
    client = Client(served["url"], verbose=False)
    gallery, status = _generate(client, served, f"{served['bad']}\n{served['tmp'] / 'missing'}", num_images=1)
    assert len(gallery) == 1  # the base still renders
    assert "holds no LoRA weights" in status and "no LoRA file" in status


def test_reports_for_runs(served):
    rows = merge_table("\n".join(str(r) for r in served["runs"]))
    assert {r[0] for r in rows} == {run_label(r) for r in served["runs"]}
    assert all(r[2] == "weight" and r[4] == "yes" for r in rows)


def test_browser_types_prompt_clicks_generate_and_sees_images(served, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is needed: bash scripts/setup.sh installs it"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(served["url"], wait_until="networkidle")
            page.locator("#prompt textarea").fill("a green square on a black background")
            page.locator("#generate").click()
            images = page.locator("#gallery img")
            images.first.wait_for(state="visible", timeout=120_000)
            page.wait_for_function("document.querySelectorAll('#gallery img').length >= 6", timeout=120_000)
            assert images.count() >= 6
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()


def test_train_button_makes_the_lora_and_reslora_runs(served, tmp_path, monkeypatch):
    from reslora_diffusers.data import default_finetune_data_dir

    data = tmp_path / "data"
    data.mkdir()
    lines = (default_finetune_data_dir() / "metadata.jsonl").read_text().splitlines()[:4]
    for line in lines:
        name = json.loads(line)["file_name"]
        (data / name).write_bytes((default_finetune_data_dir() / name).read_bytes())
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(demo_app, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(demo_app, "TRAIN_STEPS", 2)
    monkeypatch.setattr(
        demo_app,
        "TRAIN_EXTRA_ARGS",
        ["--pretrained_model_name_or_path", str(served["base"]), "--train_data_dir", str(data)]
        + ["--train_batch_size", "2", "--validation_prompt", "a red cross on a white background"]
        + ["--num_validation_images", "1", "--validation_steps", "100"],
    )
    seen = []
    update, message = demo_app.train_default_runs(progress=lambda frac, desc=None: seen.append(frac))
    assert message.startswith("Trained LoRA, ResLoRA"), message
    for folder in ("lora", "reslora"):
        assert (tmp_path / "runs" / folder / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((tmp_path / "runs" / "lora" / "merge_report.json").read_text())["res_type"] == "none"
    assert update["value"].splitlines() == [str(tmp_path / "runs" / f) for f in ("lora", "reslora")]


def test_a_lora_that_fails_to_load_or_holds_nan_fails_alone(served):
    """A rank mismatch between A and B passes the key/shape pre-check and fails inside diffusers'
    loader; NaN weights load but draw black images: both are reported, the others still render."""
    good = served["runs"][0]
    tensors = load_file(good / "pytorch_lora_weights.safetensors")
    folder = served["tmp"] / "bad_files"
    folder.mkdir(exist_ok=True)
    key_a = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    rank, width = tensors[key_a].shape
    save_file({**tensors, key_a: torch.randn(rank + 1, width)}, str(folder / "mismatched.safetensors"))
    key_b = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    nan = {**tensors, key_b: torch.full_like(tensors[key_b], float("nan"))}
    save_file(nan, str(folder / "nan_weights.safetensors"))

    client = Client(served["url"], verbose=False)
    loras = "\n".join(
        [str(folder / "mismatched.safetensors"), str(good), str(folder / "nan_weights.safetensors")]
    )
    gallery, status = _generate(client, served, loras, num_images=1)
    captions = [item["caption"] for item in gallery]
    assert len(gallery) == 2 and captions[0].startswith("base") and captions[1].startswith("LoRA (lora)")
    assert "**mismatched**" in status and "**nan_weights**" in status
    assert f"tensor {key_b!r} holds NaN or infinite values" in status


def test_temporary_folders_of_interrupted_exports_are_not_runs(tmp_path):
    for name in ("reslora", ".reslora.k2x9.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert demo_app.found_runs(tmp_path) == [str(tmp_path / "reslora")]
