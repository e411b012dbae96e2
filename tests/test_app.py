"""The Gradio demo, driven through gradio_client and through a real headless Chromium."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import app.app as demo_app
from app.app import build_app, merge_table, run_label
from reslora_diffusers.data import extra_colors, vocabulary_words, write_tokenizer
from tests.tiny_dits import tiny_sd3_pipeline
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
    """The demo on a tiny UNet base and a tiny SD3 base (as the embedded ones), with the four runs
    its Train button made, LoRA and ResLoRA on each base (2 steps each, a high learning rate so
    that the LoRAs visibly change the images), and a file that is no LoRA inside the LoRA run's
    folder."""
    from reslora_diffusers.data import default_finetune_data_dir

    tmp = tmp_path_factory.mktemp("app")
    base_dir, dit_dir = tmp / "tiny-sd", tmp / "tiny-sd3"
    tiny_sd_pipeline(tmp / "sd-parts").save_pretrained(str(base_dir))
    tiny_sd3_pipeline(tmp / "sd3-parts").save_pretrained(str(dit_dir))
    data = _copy_rows(default_finetune_data_dir(), tmp / "data", 4)
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setattr(demo_app, "RUNS_DIR", tmp / "runs")
        mp.setattr(demo_app, "TRAIN_STEPS", {"unet": 2, "dit": 2})
        mp.setattr(demo_app, "DEFAULT_BASES", {"unet": base_dir, "dit": dit_dir})
        mp.setattr(
            demo_app,
            "TRAIN_EXTRA_ARGS",
            ["--train_data_dir", str(data)]
            + ["--train_batch_size", "2", "--learning_rate", "0.1", "--calibration_batches", "1"]
            + ["--validation_prompt", "a red cross on a white background"]
            + ["--num_validation_images", "1", "--validation_steps", "100"],
        )
        # the Train button, then the optional extras' button, as the page calls them
        trained = demo_app.train_quick_start("", [], progress=lambda frac, desc=None: seen.append(frac))
        trained_extras = demo_app.train_extras(trained[0], trained[1], progress=lambda frac, desc=None: None)
        runs = [tmp / "runs" / "lora", tmp / "runs" / "reslora"]
        dit_runs = [tmp / "runs" / "dit-lora", tmp / "runs" / "dit-reslora"]
        bad = runs[0] / "not_a_lora.safetensors"
        save_file({"weight": torch.zeros(3, 3)}, str(bad))
        demo = build_app()  # the default bases (both) and the runs in RUNS_DIR, with the Train buttons
        port = _free_port()
        demo_app.launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
        try:
            yield {
                "url": f"http://127.0.0.1:{port}/",
                "base": base_dir,
                "dit_base": dit_dir,
                "runs": runs,
                "dit_runs": dit_runs,
                "bad": bad,
                "tmp": tmp,
                "trained": trained,
                "trained_extras": trained_extras,
                "progress": seen,
            }
        finally:
            demo.close()


def _generate(
    client, served, loras, seed=3, num_images=2, prompt="a red circle on a white background", bases=None
):
    """The /generate endpoint; on the UNet base alone unless ``bases`` says otherwise."""
    return client.predict(
        prompt,
        "",
        seed,
        4,
        3.0,
        1.0,
        num_images,
        "\n".join(str(b) for b in bases or [served["base"]]),
        loras,
        api_name="/generate",
    )


def _pixels(item: dict) -> bytes:
    return Image.open(item["image"]).convert("RGB").tobytes()


@pytest.mark.slow
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
    assert captions[0].startswith("base tiny-sd | seed 3") and captions[1].startswith("base tiny-sd | seed 4")
    assert captions[2].startswith("LoRA (lora) on tiny-sd | seed 3")
    assert captions[4].startswith("ResLoRA ms m=1 (reslora) on tiny-sd | seed 3")
    assert all("color" in c and "shape" in c and "(read: " in c for c in captions)
    assert status == "Rendered 3 models with the same seeds."
    again, _ = _generate(client, served, loras)
    pixels = [image.tobytes() for image in images]
    assert pixels == [Image.open(item["image"]).convert("RGB").tobytes() for item in again]
    assert pixels[0] != pixels[2]  # the LoRA changes the image


@pytest.mark.slow
def test_each_base_renders_followed_by_the_loras_made_for_it(served):
    """Both bases and the four runs, listed out of order: each base's images, then those of the
    runs whose keys fit it, every model with the same seeds; the DiT runs change the DiT base's
    images. Listing the DiT base first moves the groups, not the images."""
    client = Client(served["url"], verbose=False)
    (lora, reslora), (dit_lora, dit_reslora) = served["runs"], served["dit_runs"]
    loras = "\n".join(str(r) for r in (dit_lora, lora, dit_reslora, reslora))
    gallery, status = _generate(
        client, served, loras, num_images=1, bases=[served["base"], served["dit_base"]]
    )
    assert status == "Rendered 6 models with the same seeds."
    models = [item["caption"].split(" | ")[0] for item in gallery]
    assert models == [
        "base tiny-sd",
        "LoRA (lora) on tiny-sd",
        "ResLoRA ms m=1 (reslora) on tiny-sd",
        "base tiny-sd3",
        "LoRA (dit-lora) on tiny-sd3",
        "ResLoRA ms m=1 (dit-reslora) on tiny-sd3",
    ]
    assert {item["caption"].split(" | ")[1] for item in gallery} == {"seed 3"}
    pixels = [_pixels(item) for item in gallery]
    assert pixels[3] != pixels[0]  # the two bases draw differently
    assert pixels[4] != pixels[3] and pixels[5] != pixels[3]  # the DiT runs change the DiT base's image
    swapped, _ = _generate(client, served, loras, num_images=1, bases=[served["dit_base"], served["base"]])
    assert [item["caption"].split(" | ")[0] for item in swapped] == models[3:] + models[:3]
    assert [_pixels(item) for item in swapped] == pixels[3:] + pixels[:3]


@pytest.mark.slow
def test_a_lora_that_no_base_takes_is_reported_and_the_others_render(served):
    client = Client(served["url"], verbose=False)
    lora, dit_lora = served["runs"][0], served["dit_runs"][0]
    # on the UNet base alone, the DiT LoRA is a LoRA for another base
    gallery, status = _generate(client, served, f"{dit_lora}\n{lora}", num_images=1)
    assert [item["caption"].split(" | ")[0] for item in gallery] == ["base tiny-sd", "LoRA (lora) on tiny-sd"]
    assert "**LoRA (dit-lora)** (not a usable LoRA, not shown): " in status
    assert "is for component 'transformer', which this pipeline lacks" in status
    # the DiT LoRA's weights under UNet keys: a LoRA for neither base
    tensors = load_file(dit_lora / "pytorch_lora_weights.safetensors")
    foreign = served["tmp"] / "foreign.safetensors"
    save_file({"unet." + k.removeprefix("transformer."): v for k, v in tensors.items()}, str(foreign))
    loras = f"{foreign}\n{lora}\n{dit_lora}"
    gallery, status = _generate(
        client, served, loras, num_images=1, bases=[served["base"], served["dit_base"]]
    )
    assert [item["caption"].split(" | ")[0] for item in gallery] == [
        "base tiny-sd",
        "LoRA (lora) on tiny-sd",
        "base tiny-sd3",
        "LoRA (dit-lora) on tiny-sd3",
    ]
    assert status.startswith("Rendered 4 models with the same seeds.\n\n")
    reason = "**foreign.safetensors** (not a usable LoRA, not shown): no base model takes it: tiny-sd: "
    assert reason in status and "names no linear or convolution layer" in status
    assert "; tiny-sd3: foreign.safetensors: key 'unet." in status and "component 'unet'" in status


@pytest.mark.slow
def test_whether_a_base_takes_a_lora_is_decided_once(served, monkeypatch):
    """Per (base, LoRA file), even once the base's pipeline has left the cache: no reload to ask again."""
    loads, checks = [], []
    load, check = demo_app.DiffusionPipeline.from_pretrained, demo_app.check_lora_file
    monkeypatch.setattr(
        demo_app.DiffusionPipeline, "from_pretrained", lambda base: loads.append(base) or load(base)
    )
    monkeypatch.setattr(
        demo_app, "check_lora_file", lambda pipe, path: checks.append(path) or check(pipe, path)
    )
    cache = demo_app.PipelineCache(size=1)
    unet, dit = str(served["base"]), str(served["dit_base"])
    lora = str(served["runs"][0] / "pytorch_lora_weights.safetensors")
    for _ in range(2):
        assert cache.rejection(unet, lora) is None
        assert "component 'unet', which this pipeline lacks" in cache.rejection(dit, lora)
    assert loads == [unet, dit] and checks == [lora, lora]


@pytest.mark.slow
def test_build_app_takes_the_bases_one_per_line(served, tmp_path):
    def base_box(demo: demo_app.gr.Blocks) -> str:
        label = "Base models (one diffusers folder per line)"
        return next(
            c["props"]["value"]
            for c in demo.get_config_file()["components"]
            if c["props"].get("label") == label
        )

    unet, dit = str(served["base"]), str(served["dit_base"])
    assert base_box(build_app(f"{dit}\n\n  {unet}\n{dit}\n", [])) == f"{dit}\n{unet}"  # in order, each once
    assert base_box(build_app([unet, dit], [])) == f"{unet}\n{dit}"
    assert base_box(build_app(None, [])) == f"{unet}\n{dit}"  # the default: both embedded bases
    assert demo_app.parse_args(["--base", unet, dit]).base == [unet, dit]
    assert demo_app.missing_runs(tmp_path / "runs") == ["LoRA", "ResLoRA", "DiT LoRA", "DiT ResLoRA"]
    with pytest.MonkeyPatch.context() as mp:  # before the DiT base is shipped
        mp.setattr(demo_app, "DEFAULT_BASES", {"unet": served["base"], "dit": tmp_path / "tiny-sd3"})
        assert base_box(build_app(None, [])) == unet
        assert demo_app.missing_runs(tmp_path / "runs") == ["LoRA", "ResLoRA"]  # no DiT run to train


@pytest.mark.slow
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


@pytest.mark.slow
def test_reports_for_runs(served):
    loras = "\n".join(str(r) for r in served["runs"])
    rows = merge_table(loras)
    assert {r[0] for r in rows} == {run_label(r) for r in served["runs"]}
    lora_report = json.loads((served["runs"][0] / "merge_report.json").read_text())
    error = lora_report["components"]["unet"]["output_error"]
    # plain LoRA: nothing was merged, so no merge method is named
    assert [r for r in rows if r[0] == "LoRA (lora)"] == [
        ["LoRA (lora)", "unet", "none (plain LoRA)", f"{error:.2e}", "yes"]
    ]
    reslora = [r for r in rows if r[0] != "LoRA (lora)"]
    assert [(r[2], r[4]) for r in reslora] == [("calibrated", "yes")]  # the merge that was exported
    comparison = demo_app.comparison_table(loras)
    assert [row[0] for row in comparison] == ["LoRA (lora)", "ResLoRA ms m=1 (reslora)"]
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_each_base_family_gets_its_own_loss_chart(served):
    """A DiT run's flow-matching loss (about 1) and a UNet run's (about 0.1) never share an axis:
    one row of charts per family, each with its own runs' smoothed losses."""
    loras = "\n".join(str(r) for r in served["dit_runs"] + served["runs"])
    fig = demo_app.curves(loras)
    assert len(fig.axes) == 4
    for ax_loss, runs, family in (
        (fig.axes[0], served["dit_runs"], "DiT transformer"),
        (fig.axes[2], served["runs"], "UNet"),
    ):
        assert ax_loss.get_title() == f"{family} runs: training loss (smoothed)"
        lines = {line.get_label(): line for line in ax_loss.get_lines()}
        assert set(lines) == {run_label(r) for r in runs}
        for run in runs:
            log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
            steps, losses = zip(*[(r["step"], r["loss"]) for r in log if "loss" in r])
            window = max(1, len(losses) // 20)
            expected = [sum(losses[i - window + 1 : i + 1]) / window for i in range(window - 1, len(losses))]
            assert list(lines[run_label(run)].get_ydata()) == pytest.approx(expected)
    assert [demo_app.lora_family(str(r)) for r in served["runs"] + served["dit_runs"]] == ["UNet"] * 2 + [
        "DiT transformer"
    ] * 2
    assert demo_app.lora_family(str(served["bad"])) == "other"


@pytest.mark.slow
def test_comparison_grid_has_one_row_per_base_with_each_models_seeds(served):
    """Both bases and the four runs: a row per base holding its base model, LoRA and ResLoRA, each
    with the two seeds' images (inline, the samples' own pixels) over what the analyser read."""
    from html.parser import HTMLParser

    class Grid(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.texts, self.cls = [], [], None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.cls = attrs.get("class")
            if self.cls == "base-row":
                self.rows.append({"models": [], "images": []})
            elif tag == "img":
                self.rows[-1]["images"].append(attrs["src"])

        def handle_data(self, data):
            if self.cls == "base-name":
                self.rows[-1]["name"] = data
            elif self.cls == "model-name":
                self.rows[-1]["models"].append(data)
            self.cls = None

    loras = "\n".join(str(r) for r in served["runs"] + served["dit_runs"])
    bases = f"{served['base']}\n{served['dit_base']}"
    gallery, status, rows = demo_app.render(
        "a red circle on a white background", "", 3, 4, 3.0, 1.0, 2, bases, loras
    )
    parser = Grid()
    parser.feed(demo_app.comparison_grid(rows))
    assert [(r["name"], r["models"]) for r in parser.rows] == [
        ("tiny-sd", ["base", "LoRA (lora)", "ResLoRA ms m=1 (reslora)"]),
        ("tiny-sd3", ["base", "LoRA (dit-lora)", "ResLoRA ms m=1 (dit-reslora)"]),
    ]
    images = [src for row in parser.rows for src in row["images"]]
    assert len(images) == len(gallery) == 12
    grid = demo_app.comparison_grid(rows)
    for src, (big, caption) in zip(images, gallery):  # the gallery's image, before its enlargement
        small = Image.open(io.BytesIO(base64.b64decode(src.removeprefix("data:image/png;base64,"))))
        assert small.size == (16, 16)
        assert small.resize(big.size, Image.Resampling.NEAREST).tobytes() == big.convert("RGB").tobytes()
        _, seed_text, reading = caption.split(" | ")
        assert f"<figcaption><b>{seed_text}</b> {html.escape(reading)}</figcaption>" in grid


def test_smoothed_loss_starts_with_a_full_window():
    steps = list(range(1, 101))
    values = [50.0, 30.0, 20.0, 10.0, 5.0] + [1.0] * 95  # a noisy start, as early training logs
    x, y = demo_app.smoothed_loss(steps, values, points=20)
    assert x == steps[4:] and len(y) == 96
    assert y[0] == pytest.approx(sum(values[:5]) / 5) and y[-1] == pytest.approx(1.0)


def test_prompt_note_knows_the_colours_a_base_was_pretrained_with(tmp_path):
    # only the first base's tokenizer decides: ours with orange, cyan and pink, or ours alone
    with_colours, plain = tmp_path / "with-colours", tmp_path / "plain"
    write_tokenizer(with_colours / "tokenizer", vocabulary_words(extra_colors(3)))
    write_tokenizer(plain / "tokenizer")
    prompt = "a pink circle on a white background"
    assert demo_app.prompt_note(prompt, f"{with_colours}\n{plain}").startswith("Every word")
    assert "**pink**: not in the vocabulary" in demo_app.prompt_note(prompt, f"{plain}\n{with_colours}")
    assert "**pink**: never a background colour" in demo_app.prompt_note(
        "a red circle on a pink background", str(with_colours)
    )


@pytest.mark.slow
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


@pytest.mark.slow
def test_train_endpoint_only_on_loopback(served):
    def api_names(demo):
        return {dep.get("api_name") for dep in demo.get_config_file()["dependencies"]}

    assert {"train", "train_extras"} <= api_names(build_app(str(served["base"])))  # runs from RUNS_DIR
    remote = build_app([str(served["base"]), str(served["dit_base"])], allow_training=False)
    assert not {"train", "train_extras"} & api_names(remote) and {"generate", "refresh"} <= api_names(remote)


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright (no browser download of its own)."""
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: .ci/install_chromium installs Debian's with apt")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        args = [
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
        ]
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        try:
            yield browser
        finally:
            browser.close()


#: the browser window of the page tests: a laptop's screen
SCREEN = {"width": 1400, "height": 900}


def _open(page, url: str, label: str) -> None:
    """Open the demo and wait until its page-load scan of the runs has drawn the reports (the
    comparison table names the run ``label``); the queue's event stream stays open, so the
    network never goes idle."""
    page.goto(url, wait_until="load")
    page.wait_for_function(
        "l => (document.querySelector('#comparison')?.innerText || '').includes(l)", arg=label, timeout=60_000
    )


@pytest.mark.slow
def test_browser_shows_vocabulary_notes_compact_grid_bad_file_and_accuracy(served, browser, tmp_path):
    """Both bases, each with its LoRA and ResLoRA, 2 images each: one row per base, every image
    loaded and captioned, and the whole page under two screens tall."""
    page = browser.new_page(viewport=SCREEN)
    _open(page, served["url"], run_label(served["dit_runs"][1]))
    assert "circle, square, triangle" in page.locator("#vocabulary").inner_text()
    bases = page.get_by_label("Base models (one diffusers folder per line)").input_value()
    assert bases == f"{served['base']}\n{served['dit_base']}"
    lora_box = page.get_by_label("LoRA outputs (one folder or .safetensors per line)")
    expected_runs = [str(r) for r in served["runs"] + served["dit_runs"]]
    assert lora_box.input_value().splitlines() == expected_runs  # the page load scanned the runs
    page.locator("#prompt textarea").fill("a red cross on a blue background")
    note = page.locator("#prompt_note")
    note.get_by_text("never a background colour").wait_for(timeout=30_000)
    assert "cross" in note.inner_text() and "blue" in note.inner_text()
    lora_box.fill(lora_box.input_value() + f"\n{served['bad']}")
    page.locator("#generate").click()
    # both bases and the four runs, 2 images each
    page.wait_for_function("document.querySelectorAll('#compare img').length >= 12", timeout=120_000)
    status = page.locator("#status")
    status.get_by_text("not a usable LoRA").wait_for(timeout=30_000)
    assert "not_a_lora.safetensors (not a usable LoRA, not shown)" in status.inner_text()
    rows = page.locator("#compare .base-row")
    assert rows.count() == 2
    for i, (name, runs) in enumerate((("tiny-sd", served["runs"]), ("tiny-sd3", served["dit_runs"]))):
        assert rows.nth(i).locator(".base-name").inner_text() == name
        models = rows.nth(i).locator(".model-name").all_inner_texts()
        assert models == ["base", *(run_label(r) for r in runs)]
        tops = {round(box["y"]) for box in (img.bounding_box() for img in rows.nth(i).locator("img").all())}
        assert len(tops) == 1  # the base's six images side by side, in one row
    captions = page.locator("#compare figcaption").all_inner_texts()
    assert len(captions) == 12 and all(c.startswith("seed ") and "(read: " in c for c in captions)
    loaded = "[...document.querySelectorAll('#compare img')].every(i => i.complete && i.naturalWidth == 16)"
    assert page.evaluate(loaded)  # inline images: none left to load lazily below the fold
    height = page.evaluate("document.documentElement.scrollHeight")
    assert height < 2 * SCREEN["height"], height
    page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)
    page.get_by_role("tab", name="Training and merge").click()
    labels = [run_label(run) for run in served["runs"] + served["dit_runs"]]
    page.wait_for_function(
        "labels => labels.every(l => document.querySelector('#accuracy').innerText.includes(l))",
        arg=labels,
        timeout=30_000,
    )
    # one row per logged evaluation: step 0 and the final one, for each run
    shown = page.locator("#accuracy").inner_text()
    assert [shown.count(label) for label in labels] == [2, 2, 2, 2]
    shot = tmp_path / "training.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.close()


@pytest.mark.slow
def test_browser_after_the_quick_start_calls_nothing_missing_and_refresh_finds_new_runs(
    served, browser, tmp_path
):
    """With the quick start's two runs alone, the page offers the DiT runs as optional extras and
    says nothing is missing; DiT runs made while the page is open appear after Refresh."""
    page = browser.new_page(viewport=SCREEN)
    lora_box = page.get_by_label("LoRA outputs (one folder or .safetensors per line)")
    away = tmp_path / "away"
    away.mkdir()
    for run in served["dit_runs"]:  # as after the quick start's two commands
        run.rename(away / run.name)
    try:
        _open(page, served["url"], run_label(served["runs"][1]))
        page.wait_for_function(
            "() => document.querySelector('#extras') && document.querySelector('#extras').offsetParent",
            timeout=30_000,
        )
        assert lora_box.input_value().splitlines() == [str(r) for r in served["runs"]]
        text = page.locator("body").inner_text()
        assert "missing" not in text.lower()
        assert "Optional extras: LoRA and ResLoRA on the DiT base" in text
        assert not page.locator("#train").is_visible()  # the quick start needs nothing more
        page.locator("#extras").get_by_text("Optional extras").click()  # open the section
        minutes = 2 * demo_app.TRAIN_MINUTES["dit"]
        extras_button = page.locator("#train_extras")
        extras_button.wait_for(timeout=10_000)
        assert extras_button.inner_text() == (
            f"Train DiT LoRA and DiT ResLoRA (2 steps each, about {minutes} min in all on an idle 2-core CPU)"
        )
    finally:
        for run in served["dit_runs"]:  # made while the page is open (as by a terminal)
            (away / run.name).rename(run)
    page.locator("#refresh").click()
    expected = [str(r) for r in served["runs"] + served["dit_runs"]]
    page.wait_for_function(
        "() => document.querySelector('#extras') == null || !document.querySelector('#extras').offsetParent",
        timeout=30_000,
    )
    assert lora_box.input_value().splitlines() == expected
    page.get_by_role("tab", name="Training and merge").click()
    page.wait_for_function(
        "l => document.querySelector('#accuracy').innerText.includes(l)",
        arg=run_label(served["dit_runs"][1]),
        timeout=30_000,
    )
    page.close()


@pytest.mark.slow
def test_train_buttons_made_the_missing_runs_and_never_overwrite(served):
    """The Train button made the quick start's two runs and left the DiT runs to the optional
    extras' button, which made them; each list and offer is what the page then shows."""
    runs_dir = served["tmp"] / "runs"
    box, known, button, extras, extras_button, note = served["trained"]
    assert note == f"Trained LoRA, ResLoRA into {runs_dir}.", note
    assert served["progress"] and max(served["progress"]) <= 1.0
    assert box.splitlines() == known == [str(runs_dir / f) for f in ("lora", "reslora")]
    assert button["visible"] is False  # the quick start is complete: the button goes away
    assert extras["visible"] is True and extras_button["visible"] is True  # still offered, as extras
    minutes = 2 * demo_app.TRAIN_MINUTES["dit"]
    expected = (
        f"Train DiT LoRA and DiT ResLoRA (2 steps each, about {minutes} min in all on an idle 2-core CPU)"
    )
    assert extras_button["value"] == expected
    assert "missing" not in note
    box, known, button, extras, extras_button, note = served["trained_extras"]
    assert note == f"Trained DiT LoRA, DiT ResLoRA into {runs_dir}."
    folders = ("lora", "reslora", "dit-lora", "dit-reslora")
    assert box.splitlines() == known == [str(runs_dir / f) for f in folders]
    assert button["visible"] is False and extras["visible"] is False and extras_button["visible"] is False
    for folder, res_type, base in zip(folders, ("none", "ms") * 2, ["base"] * 2 + ["dit_base"] * 2):
        assert json.loads((runs_dir / folder / "merge_report.json").read_text())["res_type"] == res_type
        card = (runs_dir / folder / "README.md").read_text()  # the run's model card names its base
        assert f'DiffusionPipeline.from_pretrained("{served[base]}")' in card, folder
        with safe_open(str(runs_dir / folder / "pytorch_lora_weights.safetensors"), "pt") as f:
            prefix = "transformer." if base == "dit_base" else "unet."
            assert all(key.startswith(prefix) for key in f.keys()), folder
            # the DiT runs train the image stream's feed-forward layers too (its recipe), not the text's
            dit_ff = {key for key in f.keys() if ".ff.net." in key and key.startswith("transformer.")}
            assert bool(dit_ff) == (base == "dit_base"), folder
            assert not [key for key in f.keys() if "ff_context" in key], folder
    lora_file = runs_dir / "reslora" / "pytorch_lora_weights.safetensors"
    before = lora_file.stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo_app, "RUNS_DIR", runs_dir)
        *_, again = demo_app.train_quick_start(box, known, progress=lambda frac, desc=None: None)
        *_, extras_again = demo_app.train_extras(box, known, progress=lambda frac, desc=None: None)
    assert again == extras_again == "Nothing to train: every run exists."
    assert lora_file.stat().st_mtime_ns == before


def test_train_button_labels_give_steps_and_measured_minutes(monkeypatch):
    monkeypatch.setattr(demo_app, "TRAIN_STEPS", {"unet": 800, "dit": 2000})
    monkeypatch.setattr(demo_app, "TRAIN_MINUTES", {"unet": 5, "dit": 20})
    text = demo_app._train_button_text
    assert text(["LoRA"]) == "Train LoRA (800 steps, about 5 min on an idle 2-core CPU)"
    both = "Train LoRA and ResLoRA (800 steps each, about 10 min in all on an idle 2-core CPU)"
    assert text(["LoRA", "ResLoRA"]) == both
    assert text(["DiT ResLoRA"]) == "Train DiT ResLoRA (2000 steps, about 20 min on an idle 2-core CPU)"


@pytest.mark.slow
def test_the_note_names_only_missing_quick_start_runs(served, tmp_path, monkeypatch):
    """With the quick start's runs there, nothing is called missing, whatever else is absent; a
    missing quick-start run is named, and only the Train button offers it."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    monkeypatch.setattr(demo_app, "RUNS_DIR", runs_dir)
    monkeypatch.setattr(demo_app, "DEFAULT_BASES", {"unet": served["base"], "dit": served["dit_base"]})
    (runs_dir / "reslora").symlink_to(served["runs"][1])
    button, extras, extras_button, note = demo_app.training_offer()
    assert note.startswith("The quick start's LoRA run is missing from ") and button["visible"]
    assert button["value"].startswith("Train LoRA (") and extras["visible"]
    assert extras_button["value"].startswith("Train DiT LoRA and DiT ResLoRA (")
    (runs_dir / "lora").symlink_to(served["runs"][0])
    button, extras, extras_button, note = demo_app.training_offer()
    assert note == "" and not button["visible"] and extras["visible"] and extras_button["visible"]


def test_a_rescan_adds_new_runs_drops_deleted_ones_and_keeps_typed_lines(tmp_path):
    def make(name):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pytorch_lora_weights.safetensors").write_bytes(b"")
        return str(tmp_path / name)

    lora, reslora = make("lora"), make("reslora")
    box, known = demo_app.updated_run_list("", [], tmp_path)
    assert box == f"{lora}\n{reslora}" and known == [lora, reslora]
    box = f"{lora}\n/my/other.safetensors"  # the user removed reslora and typed a file of their own
    new = make("zzz")
    shutil.rmtree(lora)
    box, known = demo_app.updated_run_list(box, known, tmp_path)
    assert box == f"/my/other.safetensors\n{new}" and known == [reslora, new]
    assert demo_app.updated_run_list("a\nb", None, tmp_path) == ("a\nb", None)  # LoRAs named at start


@pytest.mark.slow
def test_refresh_offers_training_only_where_the_page_has_train_buttons(served, tmp_path, monkeypatch):
    """With no run trained yet: the local page names the missing quick-start runs and shows the
    Train button; a page without Train buttons (a remote demo) asks nobody to press one."""
    monkeypatch.setattr(demo_app, "RUNS_DIR", tmp_path / "runs")

    def rescan(demo):
        return next(f for f in demo.fns.values() if f.api_name == "refresh").fn("", [])

    assert rescan(build_app(allow_training=False)) == ("", [], "")
    box, known, button, extras, extras_button, note = rescan(build_app())
    assert (box, known) == ("", []) and button["visible"] and extras["visible"]
    assert note.startswith("The quick start's LoRA and ResLoRA runs are missing from ")


@pytest.mark.slow
def test_api_names_each_endpoint_once_and_every_value_by_its_label(served):
    info = build_app().get_api_info()["named_endpoints"]
    assert set(info) == {"/generate", "/prompt_note", "/refresh", "/reports", "/train", "/train_extras"}
    labels = [r["label"] for endpoint in info.values() for r in endpoint["returns"]]
    assert not [label for label in labels if label.startswith("value_")]
    assert [r["label"] for r in info["/generate"]["returns"]] == [
        "each base, then its LoRA and ResLoRA",
        "status",
    ]


def test_gallery_puts_the_models_in_one_row_when_they_fit():
    runs = "runs/lora\nruns/reslora"
    assert demo_app.gallery_columns(2, "base", runs)["columns"] == 6  # base + 2 runs, 2 each
    assert demo_app.gallery_columns(4, "base", runs + "\n")["columns"] == 4  # one row per model
    assert demo_app.gallery_columns(1, "base", "")["columns"] == 1
    # every base counts: 2 bases + 4 runs, 1 each, fill one row; 2 each do not
    assert demo_app.gallery_columns(1, "a\nb\n", runs + "\nruns/dit-lora\nruns/dit-reslora")["columns"] == 6
    assert demo_app.gallery_columns(2, "a\nb", runs)["columns"] == 2


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_unet_lora_loads_without_diffusers_warning_for_each_text_encoder(served):
    """diffusers' own load_lora_weights warns that the UNet-only file has no text-encoder keys
    (the control); load_lora_file, which every render uses, loads the same weights without it,
    and the logger's other warnings still pass."""
    from diffusers import DiffusionPipeline

    from reslora_diffusers.export.loading import load_lora_file

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("diffusers.loaders.lora_base")
    log.addHandler(handler)
    try:
        plain = DiffusionPipeline.from_pretrained(str(served["base"]))
        plain.load_lora_weights(str(served["runs"][0]))
        assert any("No LoRA keys associated to CLIPTextModel" in r.getMessage() for r in records)
        records.clear()
        quiet = DiffusionPipeline.from_pretrained(str(served["base"]))
        load_lora_file(quiet, served["runs"][0])
        log.warning("a real problem")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["a real problem"]
    weights = dict(plain.unet.named_parameters())
    assert any(".lora_A." in name for name in weights)
    for name, value in quiet.unet.named_parameters():
        assert torch.equal(value, weights[name]), name


def test_runs_are_listed_default_runs_first_in_their_order(tmp_path):
    for name in ("aaa", "dit-reslora", "reslora", "zzz", "dit-lora", "lora"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pytorch_lora_weights.safetensors").write_bytes(b"")
    expected = ["lora", "reslora", "dit-lora", "dit-reslora", "aaa", "zzz"]
    assert demo_app.found_runs(tmp_path) == [str(tmp_path / name) for name in expected]


def test_temporary_folders_of_interrupted_exports_are_not_runs(tmp_path):
    for name in ("reslora", ".reslora.k2x9.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert demo_app.found_runs(tmp_path) == [str(tmp_path / "reslora")]


@pytest.mark.slow
def test_a_demo_other_machines_reach_reads_only_its_runs_and_bases(served, tmp_path):
    """--host 0.0.0.0: LoRA outputs only from the runs folder (and those named at start), bases
    only those listed; a path outside is refused without a word on whether it exists or what it is."""
    import shutil

    assert demo_app.allowed_paths(demo_app.parse_args([])) is None  # loopback: no restriction
    allowed = demo_app.allowed_paths(
        demo_app.parse_args(["--host", "0.0.0.0", "--base", str(served["base"])])
    )
    outside_run = tmp_path / "outside-run"
    shutil.copytree(served["runs"][0], outside_run)  # a real LoRA, outside the runs folder
    outside_base = tmp_path / "outside-base"
    shutil.copytree(served["base"], outside_base)
    secret = tmp_path / "secret.txt"
    secret.write_text("not a LoRA")
    runs_dir = served["tmp"] / "runs"
    demo = build_app(str(served["base"]), None, allow_training=False, allowed=allowed)
    port = _free_port()
    demo_app.launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        refused = [outside_run, "/root/no-such-file", secret, runs_dir / ".." / "outside-run-x"]
        gallery, status = _generate(client, served, "\n".join(map(str, [served["runs"][0], *refused])))
        assert len(gallery) == 4  # the base and the run inside runs/, 2 images each
        assert "**4 LoRA output(s) not shown**" in status
        for text in ("outside", "no-such-file", "secret", str(tmp_path), "does not exist", "not a"):
            assert text not in status, text

        gallery, status = _generate(client, served, "", bases=[outside_base])
        assert gallery == [] and "**1 base model(s) not shown**" in status and str(outside_base) not in status
        gallery, status = _generate(client, served, "", bases=[served["dit_base"]])  # not listed
        assert gallery == [] and "**1 base model(s) not shown**" in status

        plot, accuracy, merges, comparison, grids = client.predict(str(outside_run), api_name="/reports")
        assert accuracy["data"] == [] and merges["data"] == [] and comparison["data"] == [] and grids is None
        inside = client.predict(str(served["runs"][0]), api_name="/reports")
        assert inside[3]["data"][0][0] == "LoRA (lora)"

        prompt = "a red cross on a blue background"
        assert demo_app.prompt_note(prompt, str(outside_base))  # the same tokenizer: a note, locally
        assert client.predict(prompt, str(outside_base), api_name="/prompt_note") == ""
        assert client.predict(prompt, str(served["base"]), api_name="/prompt_note") == demo_app.prompt_note(
            prompt, str(served["base"])
        )
    finally:
        demo.close()


def test_a_used_port_is_one_line_before_the_heavy_imports():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "app/app.py", "--port", str(port)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"app.py: error: --port {port}: 127.0.0.1:{port} is in use (Address already in use); "
        "stop the other server or choose another --port"
    )
