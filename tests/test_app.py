"""The Gradio demo, driven through gradio_client and through a real headless Chromium."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client
from PIL import Image
from safetensors.torch import load_file, save_file

import app.app as demo_app
from app.app import build_app, merge_table, run_label
from tests.tiny_pipes import tiny_sd_pipeline

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_rows(src: Path, dst: Path, count: int) -> Path:
    """The first ``count`` images of an imagefolder, as a new imagefolder."""
    dst.mkdir()
    lines = (src / "metadata.jsonl").read_text().splitlines()[:count]
    for line in lines:
        name = json.loads(line)["file_name"]
        (dst / name).write_bytes((src / name).read_bytes())
    (dst / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return dst


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The demo on a tiny base, with the LoRA and ResLoRA runs its Train button made (2 steps each,
    a high learning rate so that the LoRAs visibly change the images) and a file that is no LoRA
    inside the LoRA run's folder."""
    from reslora_diffusers.data import default_finetune_data_dir

    tmp = tmp_path_factory.mktemp("app")
    base_dir = tmp / "base"
    tiny_sd_pipeline(tmp).save_pretrained(str(base_dir))
    data = _copy_rows(default_finetune_data_dir(), tmp / "data", 4)
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setattr(demo_app, "RUNS_DIR", tmp / "runs")
        mp.setattr(demo_app, "TRAIN_STEPS", 2)
        mp.setattr(
            demo_app,
            "TRAIN_EXTRA_ARGS",
            ["--pretrained_model_name_or_path", str(base_dir), "--train_data_dir", str(data)]
            + ["--train_batch_size", "2", "--learning_rate", "0.1", "--calibration_batches", "1"]
            + ["--validation_prompt", "a red cross on a white background"]
            + ["--num_validation_images", "1", "--validation_steps", "100"],
        )
        trained = demo_app.train_missing_runs(progress=lambda frac, desc=None: seen.append(frac))
        runs = [tmp / "runs" / "lora", tmp / "runs" / "reslora"]
        bad = runs[0] / "not_a_lora.safetensors"
        save_file({"weight": torch.zeros(3, 3)}, str(bad))
        demo = build_app(str(base_dir), [str(r) for r in runs])
        port = _free_port()
        demo_app.launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
        try:
            yield {
                "url": f"http://127.0.0.1:{port}/",
                "base": base_dir,
                "runs": runs,
                "bad": bad,
                "tmp": tmp,
                "trained": trained,
                "progress": seen,
            }
        finally:
            demo.close()


def _generate(client, served, loras, seed=3, num_images=2, prompt="a red circle on a white background"):
    return client.predict(
        prompt,
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


def test_generate_endpoint_returns_labelled_crisp_images_repeatably(served):
    client = Client(served["url"], verbose=False)
    loras = "\n".join(str(r) for r in served["runs"])
    gallery, status = _generate(client, served, loras)
    assert len(gallery) == 3 * 2  # base, LoRA, ResLoRA; 2 images each
    images = [Image.open(item["image"]).convert("RGB") for item in gallery]
    assert {image.size for image in images} == {(192, 192)}  # 16 px samples (tiny UNet 8 x VAE 2), x12
    for image in images:  # nearest-neighbour: every 12 x 12 block is one colour
        small = image.resize((16, 16), Image.Resampling.NEAREST)
        assert small.resize((192, 192), Image.Resampling.NEAREST).tobytes() == image.tobytes()
    captions = [item["caption"] for item in gallery]
    assert captions[0].startswith("base | seed 3") and captions[1].startswith("base | seed 4")
    assert captions[2].startswith("LoRA (lora)") and captions[4].startswith("ResLoRA bs m=1 (reslora)")
    assert all("color" in c and "shape" in c and "(read: " in c for c in captions)
    assert status == "Rendered 3 models with the same seeds."
    again, _ = _generate(client, served, loras)
    pixels = [image.tobytes() for image in images]
    assert pixels == [Image.open(item["image"]).convert("RGB").tobytes() for item in again]
    assert pixels[0] != pixels[2]  # the LoRA changes the image


def test_a_file_that_is_not_a_lora_is_labelled_as_such(served):
    client = Client(served["url"], verbose=False)
    # the bad file lies in the LoRA run's folder, whose merge report describes the run's export only
    gallery, status = _generate(client, served, f"{served['bad']}\n{served['tmp'] / 'missing'}", num_images=1)
    assert len(gallery) == 1  # the base still renders
    assert "**not_a_lora.safetensors** (not a usable LoRA, not shown): " in status
    assert "holds no LoRA weights" in status and "no LoRA file" in status
    assert "LoRA (lora)" not in status
    assert run_label(served["bad"]) == "not_a_lora.safetensors"
    assert run_label(served["runs"][0] / "pytorch_lora_weights.safetensors") == "LoRA (lora)"


def test_reports_for_runs(served):
    loras = "\n".join(str(r) for r in served["runs"])
    rows = merge_table(loras)
    assert {r[0] for r in rows} == {run_label(r) for r in served["runs"]}
    assert all(r[4] == "yes" for r in rows if r[2] == "calibrated") and any(r[4] for r in rows)
    comparison = demo_app.comparison_table(loras)
    assert [row[0] for row in comparison] == ["LoRA (lora)", "ResLoRA bs m=1 (reslora)"]
    for row, run in zip(comparison, served["runs"]):
        log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        final = [r for r in log if r.get("kind") == "final"]
        assert row[1] == 2 and row[3] == f"{final[0]['prompt_accuracy']:.1%}"
        report = json.loads((run / "merge_report.json").read_text())
        assert row[4] == f"unet {report['components']['unet']['output_error']:.1e}"
    stacked = np.asarray(demo_app.final_grids(loras))
    y = 0
    for run in served["runs"]:  # each run's final grid, whole, under a strip for its label
        grid = np.asarray(Image.open(run / "validation" / "final.png").convert("RGB"))
        y += 24
        assert (stacked[y : y + grid.shape[0], : grid.shape[1]] == grid).all()
        y += grid.shape[0]
    assert stacked.shape[0] == y


def test_accuracy_chart_has_the_logged_points_of_every_run(served):
    """Every validation and the final evaluation of each run, as the training script logged them."""
    loras = "\n".join(str(r) for r in served["runs"])
    fig = demo_app.curves(loras)
    ax_acc = fig.axes[1]
    lines = {line.get_label(): line for line in ax_acc.get_lines()}
    assert set(lines) == {run_label(r) for r in served["runs"]}
    for run in served["runs"]:
        log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        expected = [(r["step"], r["prompt_accuracy"]) for r in log if "prompt_accuracy" in r]
        assert len(expected) == 2  # step 0 and the final evaluation
        assert list(zip(*lines[run_label(run)].get_data())) == expected
    assert len(demo_app.accuracy_table(loras)) == 4


def test_smoothed_loss_starts_with_a_full_window():
    steps = list(range(1, 101))
    values = [50.0, 30.0, 20.0, 10.0, 5.0] + [1.0] * 95  # a noisy start, as early training logs
    x, y = demo_app.smoothed_loss(steps, values, points=20)
    assert x == steps[4:] and len(y) == 96
    assert y[0] == pytest.approx(sum(values[:5]) / 5) and y[-1] == pytest.approx(1.0)


def test_prompt_note_names_the_words_the_base_never_saw(served, tmp_path):
    note = demo_app.prompt_note("a red cross on a blue background", str(served["base"]))
    assert "**cross**" in note and "**blue**: never a background colour" in note and "**red**" not in note
    assert demo_app.prompt_note("A pink dog", str(served["base"])).count("not in the vocabulary") == 2
    assert "Every word" in demo_app.prompt_note("a red circle on a white background", str(served["base"]))
    # a base with another tokenizer (a real SD model, say) gets no note about our vocabulary
    assert demo_app.prompt_note("a red cross on a blue background", str(tmp_path)) == ""


def test_help_answers_without_the_heavy_imports():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['app.py', '--help']\n"
        "try:\n    runpy.run_path('app/app.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('heavy:', sorted(m for m in ('torch', 'gradio', 'diffusers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60, check=True
    ).stdout
    assert "--port PORT" in out and "port to serve on (default: 7860)" in out
    assert "heavy: []" in out


def test_train_endpoint_only_on_loopback(served):
    def api_names(demo):
        return {dep.get("api_name") for dep in demo.get_config_file()["dependencies"]}

    assert "train" in api_names(build_app(str(served["base"]), []))
    remote = build_app(str(served["base"]), [], allow_training=False)
    assert "train" not in api_names(remote) and "generate" in api_names(remote)


def test_browser_shows_vocabulary_notes_full_captions_bad_file_and_accuracy(served, tmp_path):
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
            assert "circle, square, triangle" in page.locator("#vocabulary").inner_text()
            page.locator("#prompt textarea").fill("a red cross on a blue background")
            note = page.locator("#prompt_note")
            note.get_by_text("never a background colour").wait_for(timeout=30_000)
            assert "cross" in note.inner_text() and "blue" in note.inner_text()
            lora_box = page.get_by_label("LoRA outputs (one folder or .safetensors per line)")
            lora_box.fill(lora_box.input_value() + f"\n{served['bad']}")
            page.locator("#generate").click()
            page.wait_for_function("document.querySelectorAll('#gallery img').length >= 6", timeout=120_000)
            status = page.locator("#status")
            status.get_by_text("not a usable LoRA").wait_for(timeout=30_000)
            assert "not_a_lora.safetensors (not a usable LoRA, not shown)" in status.inner_text()
            caption = page.locator("#gallery .caption-label").first
            caption.wait_for(timeout=30_000)
            assert "(read: " in caption.inner_text()
            # nothing of the caption is cut off: its box holds all of its text
            clipped = caption.evaluate(
                "e => e.scrollWidth > e.clientWidth || e.scrollHeight > e.clientHeight"
            )
            assert not clipped
            page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)
            page.get_by_role("tab", name="Training and merge").click()
            labels = [run_label(run) for run in served["runs"]]
            page.wait_for_function(
                "labels => labels.every(l => document.querySelector('#accuracy').innerText.includes(l))",
                arg=labels,
                timeout=30_000,
            )
            # one row per logged evaluation: step 0 and the final one, for each run
            shown = page.locator("#accuracy").inner_text()
            assert [shown.count(label) for label in labels] == [2, 2]
            shot = tmp_path / "training.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()


def test_train_button_made_the_missing_runs_and_never_overwrites(served):
    update, visible, message = served["trained"]
    runs_dir = served["tmp"] / "runs"
    assert message == f"Trained LoRA, ResLoRA into {runs_dir}.", message
    assert served["progress"] and max(served["progress"]) <= 1.0
    assert update["value"].splitlines() == [str(runs_dir / f) for f in ("lora", "reslora")]
    assert visible["visible"] is False  # nothing left to train: the button goes away
    assert json.loads((runs_dir / "lora" / "merge_report.json").read_text())["res_type"] == "none"
    lora_file = runs_dir / "reslora" / "pytorch_lora_weights.safetensors"
    before = lora_file.stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo_app, "RUNS_DIR", runs_dir)
        _, _, again = demo_app.train_missing_runs(progress=lambda frac, desc=None: None)
    assert again == "Nothing to train: every run exists."
    assert lora_file.stat().st_mtime_ns == before


def test_gallery_puts_the_models_in_one_row_when_they_fit():
    assert demo_app.gallery_columns(2, "runs/lora\nruns/reslora")["columns"] == 6  # base + 2 runs, 2 each
    assert demo_app.gallery_columns(4, "runs/lora\nruns/reslora\n")["columns"] == 4  # one row per model
    assert demo_app.gallery_columns(1, "")["columns"] == 1


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
    assert "**mismatched.safetensors** (not a usable LoRA" in status
    assert "**nan_weights.safetensors** (not a usable LoRA" in status
    assert f"tensor {key_b!r} holds NaN or infinite values" in status


def test_temporary_folders_of_interrupted_exports_are_not_runs(tmp_path):
    for name in ("reslora", ".reslora.k2x9.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert demo_app.found_runs(tmp_path) == [str(tmp_path / "reslora")]
