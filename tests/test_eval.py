"""The shape/colour analyser, the prompt metric and the pipeline evaluation loop."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from reslora_diffusers.data import ALL_SHAPES, BACKGROUNDS, COLORS, caption, random_sample, render
from reslora_diffusers.eval import analyse_image, evaluate_pipeline, parse_prompt, prompt_accuracy


def _ground_truth(num_images: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    triplets = list(itertools.product(COLORS, ALL_SHAPES, BACKGROUNDS))
    return [random_sample(rng, *triplets[i % len(triplets)]) for i in range(num_images)]


def test_analyser_reads_ground_truth():
    samples = _ground_truth(600)
    correct = [
        (a["color"], a["shape"], a["background"]) == (s.color, s.shape, s.background)
        for s, a in ((s, analyse_image(s.image)) for s in samples)
    ]
    assert np.mean(correct) >= 0.98


def test_analyser_reports_geometry():
    analysis = analyse_image(render("square", "blue", "black", size=0.5))
    assert analysis["area"] == pytest.approx(0.25, abs=0.03)
    assert analysis["fill_ratio"] > 0.95
    assert max(analysis["shape_scores"], key=analysis["shape_scores"].get) == "square"


def test_analyser_finds_no_shape_on_a_blank_image():
    analysis = analyse_image(Image.new("RGB", (32, 32), BACKGROUNDS["gray"]))
    assert analysis["background"] == "gray"
    assert analysis["shape"] is None and analysis["color"] is None


def test_parse_prompt():
    assert parse_prompt("a red cross on a white background") == {
        "color": "red",
        "shape": "cross",
        "background": "white",
    }
    assert parse_prompt("A big Yellow square") == {"color": "yellow", "shape": "square", "background": None}
    assert parse_prompt("a photo") == {"color": None, "shape": None, "background": None}


def test_prompt_accuracy_counts_all_named_attributes():
    samples = _ground_truth(len(COLORS) * len(ALL_SHAPES) * len(BACKGROUNDS))
    images = [s.image for s in samples]
    assert prompt_accuracy(images, [s.text for s in samples]) == 1.0
    assert prompt_accuracy(images, [caption(s.color, s.shape, "white") for s in samples]) == pytest.approx(
        1 / 3
    )
    assert prompt_accuracy(images, [f"a {s.shape}" for s in samples]) == 1.0
    with pytest.raises(ValueError, match="prompts"):
        prompt_accuracy(images, ["a red circle"])


class _RenderingPipeline:
    """Stands in for a text-to-image pipeline: renders the prompt, placed by the seeded generator."""

    def set_progress_bar_config(self, **kwargs):
        self._progress_bar_config = kwargs

    def __call__(self, prompt, generator, num_inference_steps, guidance_scale, height, width):
        images = []
        for text, gen in zip(prompt, generator, strict=True):
            parsed = parse_prompt(text)
            x, y = (0.3 + 0.4 * v for v in np.random.default_rng(gen.initial_seed()).random(2))
            images.append(
                render(parsed["shape"], parsed["color"], parsed["background"], size=0.4, center=(x, y))
            )
        return SimpleNamespace(images=images)


def test_evaluate_pipeline_generates_every_prompt_and_seed():
    prompts = [caption("red", "circle", "white"), caption("green", "triangle", "black")]
    pipe = _RenderingPipeline()
    pipe.set_progress_bar_config(desc="kept")
    result = evaluate_pipeline(pipe, prompts, seeds=[0, 1, 2], batch_size=4)
    assert result["accuracy"] == result["shape_accuracy"] == 1.0
    assert result["prompts"] == prompts * 3 and result["seeds"] == [0, 0, 1, 1, 2, 2]
    assert len(result["images"]) == len(result["analyses"]) == 6
    assert result["images"][0].tobytes() != result["images"][2].tobytes()
    assert pipe._progress_bar_config == {"desc": "kept"}
