"""The demo on FLUX.2 and Wan bases: each family's LoRA (a training run of the script) is drawn on
the base of its family with the family's LoRA-scale keyword, and a video as its first, middle and
last frame; the images are those of the pipeline called directly with the LoRA loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import app.app as demo_app
from reslora_diffusers.frontends import WAN_PIPELINES
from tests.runs import run, run_dit, subset
from tests.tiny_flux2 import tiny_flux2_pipeline
from tests.tiny_wan import SIDE, clip_folder, tiny_wan_pipeline

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

PROMPT = "a red square moves right"
#: Wan draws 480 x 832 by default, over a minute for the tiny model on one thread: the test
#: draws its frames small
WAN_TEST_SIZE = {"height": SIDE, "width": SIDE}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """``{family: (base folder, run folder)}``: 2 steps of the script at a high learning rate."""
    root = tmp_path_factory.mktemp("demo")
    tiny_flux2_pipeline(root / "f").save_pretrained(root / "tiny-flux2")
    tiny_wan_pipeline(root / "w").save_pretrained(root / "tiny-wan")
    extra = ["--max_train_steps", "2", "--res_type", "bs", "--learning_rate", "0.1", "--report_to", "none"]
    run_dit(root / "tiny-flux2", subset(root / "images", 4), root / "flux2-run", *extra)
    clips = clip_folder(root / "clips")
    wan = [
        "--resolution",
        str(SIDE),
        "--num_frames",
        "5",
        "--train_batch_size",
        "2",
        "--calibration_batches",
        "1",
    ]
    run(root / "tiny-wan", clips, root / "wan-run", *wan, "--caption_extension", ".txt", *extra)
    return {"flux2": (root / "tiny-flux2", root / "flux2-run"), "wan": (root / "tiny-wan", root / "wan-run")}


def _direct(base: Path, lora: Path | None, seed: int, **kwargs):
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
        kwargs["attention_kwargs"] = {"scale": 1.0}
    return pipe(
        prompt=[PROMPT],
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=[torch.Generator().manual_seed(seed)],
        **kwargs,
    )


@pytest.mark.slow  # about 12 s: two training runs and eight pipeline calls
def test_the_demo_draws_each_familys_lora_on_a_base_of_its_family(runs, monkeypatch):
    monkeypatch.setattr(demo_app, "CACHE", demo_app.PipelineCache(size=8))
    monkeypatch.setattr(WAN_PIPELINES, "generation_kwargs", lambda: {"num_frames": 17, **WAN_TEST_SIZE})
    bases = "\n".join(str(runs[f][0]) for f in ("flux2", "wan"))
    loras = "\n".join(str(runs[f][1]) for f in ("wan", "flux2"))  # listed in the other order
    _, status, rows = demo_app.render(PROMPT, "", 7, 2, 3.0, 1.0, 1, bases, loras)
    assert status == "Rendered 4 models with the same seeds."
    assert [where for where, _ in rows] == ["tiny-flux2", "tiny-wan"]  # each LoRA on its family's base
    flux2, wan = (dict(models) for _, models in rows)
    assert set(flux2) == {"base", demo_app.run_label(runs["flux2"][1])}
    assert set(wan) == {"base", demo_app.run_label(runs["wan"][1])}

    flux2_base, flux2_run = runs["flux2"]
    for label, lora in (("base", None), (demo_app.run_label(flux2_run), flux2_run)):
        ((image, caption),) = flux2[label]
        want = _direct(flux2_base, lora, 7).images[0]
        assert np.array_equal(np.asarray(image), np.asarray(want)), label
        assert caption.startswith("seed 7 | ")

    wan_base, wan_run = runs["wan"]
    strips = {}
    for label, lora in (("base", None), (demo_app.run_label(wan_run), wan_run)):
        ((strip, caption),) = wan[label]
        assert caption == "seed 7 | first, middle and last frame"
        frames = _direct(wan_base, lora, 7, num_frames=17, **WAN_TEST_SIZE).frames[
            0
        ]  # (17, H, W, 3) in [0, 1]
        want = np.concatenate([frames[i] for i in (0, 8, 16)], axis=1)
        want = np.clip(np.rint(want * 255), 0, 255).astype(np.uint8)
        assert strip.size == (3 * SIDE, SIDE) and np.array_equal(np.asarray(strip), want), label
        strips[label] = np.asarray(strip)
    assert len({s.tobytes() for s in strips.values()}) == 2  # the LoRA changes the video
