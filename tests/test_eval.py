"""The shape/colour analyser, the prompt metric and the pipeline evaluation loop."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from reslora_diffusers.data import ALL_SHAPES, BACKGROUNDS, COLORS, caption, random_sample, render
from reslora_diffusers.eval import (
    analyse_image,
    evaluate_pipeline,
    parse_prompt,
    prompt_accuracies,
    prompt_accuracy,
)


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
    # a colour outside the analyser's palette is named only when the caller lists it
    assert parse_prompt("a orange triangle")["color"] is None
    assert parse_prompt("a orange triangle", colors=("red", "orange"))["color"] == "orange"


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

    def __call__(self, prompt, generator, num_inference_steps, guidance_scale, height=None, width=None):
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
    assert result["accuracy"] == result["shape_accuracy"] == result["accuracy_lenient"] == 1.0
    assert result["shape_accuracy_lenient"] == 1.0
    assert result["prompts"] == prompts * 3 and result["seeds"] == [0, 0, 1, 1, 2, 2]
    assert len(result["images"]) == len(result["analyses"]) == 6
    assert result["images"][0].tobytes() != result["images"][2].tobytes()
    assert pipe._progress_bar_config == {"desc": "kept"}


# -- the open-set shape call, calibrated ------------------------------------------------
def _drawn(rng, draw_shape, num: int) -> list[Image.Image]:
    """``num`` images of a polygon the generator never draws, at the generator's sizes,
    positions and colours (drawn at 4x and box-downsampled, as the generator does)."""
    images = []
    for _ in range(num):
        big = Image.new("RGB", (128, 128), BACKGROUNDS[rng.choice(list(BACKGROUNDS))])
        half = rng.uniform(0.35, 0.65) * 64
        cx, cy = rng.uniform(0.35, 0.65, 2) * 128
        draw_shape(ImageDraw.Draw(big), cx, cy, half, COLORS[rng.choice(list(COLORS))], rng)
        images.append(big.reduce(4))
    return images


def _rhombus(draw, cx, cy, h, fill, rng):
    draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)


def _blob(draw, cx, cy, h, fill, rng):
    """A random 7-gon: corners at random angles and radii between h/2 and h."""
    angles, radii = np.sort(rng.uniform(0, 2 * np.pi, 7)), h * rng.uniform(0.5, 1.0, 7)
    draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)], fill=fill)


def _quadrant_cut(image: Image.Image, k: int) -> Image.Image:
    """The shape with quadrant ``k`` of its bounding box painted over in the background colour."""
    pixels = np.asarray(image).copy()
    bg = pixels[0, 0]
    rows, cols = np.nonzero(np.abs(pixels.astype(int) - bg).sum(-1) > 60)
    cy, cx = (rows.min() + rows.max() + 1) // 2, (cols.min() + cols.max() + 1) // 2
    pixels[(slice(None, cy), slice(cy, None))[k // 2], (slice(None, cx), slice(cx, None))[k % 2]] = bg
    return Image.fromarray(pixels)


def _shapes(images, open_set=True):
    return [analyse_image(image, open_set=open_set)["shape"] for image in images]


def test_open_set_call_is_right_on_clean_images_of_every_shape():
    samples = _ground_truth(1200, seed=1)  # 300 of each shape
    calls = _shapes([s.image for s in samples])
    for shape in ALL_SHAPES:
        right = [c == s.shape for c, s in zip(calls, samples) if s.shape == shape]
        assert len(right) == 300 and np.mean(right) >= 0.99, shape


def test_open_set_call_says_unknown_for_shapes_that_are_none_of_the_four():
    rng = np.random.default_rng(2)
    rhombi, blobs = _drawn(rng, _rhombus, 200), _drawn(rng, _blob, 200)
    # the nearest template is a cross for nearly every rhombus: the lenient reading counts it
    assert np.mean([c == "cross" for c in _shapes(rhombi, open_set=False)]) >= 0.9
    assert np.mean([c == "unknown" for c in _shapes(rhombi)]) >= 0.95
    assert np.mean([c == "unknown" for c in _shapes(blobs)]) >= 0.9
    cut = [_quadrant_cut(s.image, i % 4) for i, s in enumerate(_ground_truth(240, seed=3))]
    assert np.mean([c == "unknown" for c in _shapes(cut)]) >= 0.8


def test_open_set_call_on_blurred_images_is_unknown_where_the_lenient_one_errs():
    samples = _ground_truth(240, seed=4)
    blurred = [s.image.filter(ImageFilter.GaussianBlur(2.0)) for s in samples]
    strict, lenient = _shapes(blurred), _shapes(blurred, open_set=False)
    lenient_wrong = [i for i, s in enumerate(samples) if lenient[i] != s.shape]
    assert len(lenient_wrong) >= 0.15 * len(samples)  # the blur really degrades the shapes
    assert np.mean([strict[i] == "unknown" for i in lenient_wrong]) >= 0.75
    strict_wrong = np.mean([c not in ("unknown", s.shape) for c, s in zip(strict, samples)])
    assert strict_wrong <= 0.25 * len(lenient_wrong) / len(samples)


def test_accuracies_report_the_strict_and_the_lenient_reading():
    rng = np.random.default_rng(5)
    images = [random_sample(rng, "red", "cross", "white").image for _ in range(3)]
    big = Image.new("RGB", (128, 128), BACKGROUNDS["white"])  # a red rhombus, read as a cross leniently
    _rhombus(ImageDraw.Draw(big), 64, 64, 32, COLORS["red"], rng)
    images.append(big.reduce(4))
    prompts = [caption("red", "cross", "white")] * 4
    assert prompt_accuracies(images, prompts) == {"prompt_accuracy": 0.75, "prompt_accuracy_lenient": 1.0}
    assert (
        prompt_accuracy(images, prompts) == 0.75 and prompt_accuracy(images, prompts, open_set=False) == 1.0
    )
