"""A deterministic analyser of coloured-shape images and the prompt-accuracy metric.

``analyse_image`` reads the background colour from the image border, separates the
foreground by projecting every pixel on the background -> foreground colour axis,
keeps the largest connected foreground region, names its colour (nearest palette
colour of its median pixel) and its shape from the IoU between the region's
bounding-box crop and each shape's template.

The shape call is open-set: the best template must reach an IoU of ``MIN_SHAPE_IOU`` and
beat the runner-up by ``MIN_SHAPE_MARGIN``, else the shape is ``"unknown"``. The nearest
template alone (the lenient reading, ``open_set=False``) names any blob after some shape: a
rhombus reads as a cross, most irregular blobs as circles. The thresholds are calibrated in
``tests/test_eval.py``: on the generator's own images (random sizes, positions and colours)
the strict call is right for at least 99 % of every shape, cross included (IoU 0.81-0.98
at the 0.5 % quantile; margins 0.06-0.20), while rhombi (best IoU below 0.79), random blobs
and shapes with a quadrant cut away are mostly "unknown".
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from functools import cache

import numpy as np
from PIL import Image

from ..data.shapes import ALL_SHAPES, BACKGROUNDS, COLORS, draw_shape_mask

#: Attributes that the analyser reads and a prompt may name.
ATTRIBUTES = ("color", "shape", "background")
#: A pixel this far (RGB Euclidean) from the background may start the foreground.
_FG_DISTANCE = 60.0
#: Fewer foreground pixels than this (fraction of the image) means "no shape".
_MIN_AREA = 0.01
_TEMPLATE_SIDE = 16
#: the open-set shape call: lowest IoU of the best template ...
MIN_SHAPE_IOU = 0.80
#: ... and its lowest lead over the second best
MIN_SHAPE_MARGIN = 0.05
#: the shape of a region that matches no template well enough
UNKNOWN_SHAPE = "unknown"


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.array([palette[n] for n in names], dtype=np.float32) - rgb, axis=1)
    return names[int(distances.argmin())]


def _border_pixels(rgb: np.ndarray) -> np.ndarray:
    return np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected region of ``mask`` (labels spread by max-propagation)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        padded = np.pad(labels, 1)
        neighbours = np.stack(
            [labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        ).max(axis=0)
        spread = np.where(mask, neighbours, 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == counts.argmax()


@cache
def _template(shape: str) -> np.ndarray:
    return draw_shape_mask(shape, _TEMPLATE_SIDE, (0.0, 0.0, float(_TEMPLATE_SIDE), float(_TEMPLATE_SIDE)))


def _shape_scores(region: np.ndarray) -> dict[str, float]:
    """Soft IoU of the binary region's bounding-box crop, resized to the template side, with each template.

    A binary crop keeps blurred corners of generated squares square; soft edges would read as round.
    """
    rows, cols = np.nonzero(region)
    crop = region.astype(np.float32)[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    resized = Image.fromarray(crop, mode="F").resize(
        (_TEMPLATE_SIDE, _TEMPLATE_SIDE), Image.Resampling.BILINEAR
    )
    crop = np.asarray(resized)
    scores = {}
    for shape in ALL_SHAPES:
        template = _template(shape)
        scores[shape] = float(np.minimum(crop, template).sum() / np.maximum(crop, template).sum())
    return scores


def open_set_shape(scores: dict[str, float]) -> str:
    """The best-scoring shape if its IoU is at least ``MIN_SHAPE_IOU`` and leads the runner-up
    by at least ``MIN_SHAPE_MARGIN``; ``"unknown"`` otherwise."""
    ranked = sorted(scores.values(), reverse=True)
    best = max(scores, key=scores.get)
    if ranked[0] >= MIN_SHAPE_IOU and ranked[0] - ranked[1] >= MIN_SHAPE_MARGIN:
        return best
    return UNKNOWN_SHAPE


def analyse_image(image: Image.Image, open_set: bool = True) -> dict:
    """Read background, colour and shape of the one shape in ``image``.

    Returns a dict with ``background``, ``color`` and ``shape`` (names; ``color`` and
    ``shape`` are None when no foreground is found; ``shape`` is ``"unknown"`` when no template
    fits, see the module doc, or with ``open_set=False`` the nearest template), ``nearest_shape``
    (the nearest template whatever its fit: the lenient reading), the measured ``background_rgb``
    and ``color_rgb``, the foreground ``area`` (fraction of the image), ``fill_ratio``
    (area / bounding-box area) and the per-shape template ``shape_scores``.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    bg = np.median(_border_pixels(rgb), axis=0)
    result = {"background": _nearest(bg, BACKGROUNDS), "background_rgb": bg.round().tolist()}
    result.update(
        color=None, shape=None, nearest_shape=None, color_rgb=None, area=0.0, fill_ratio=0.0, shape_scores={}
    )
    candidates = np.linalg.norm(rgb - bg, axis=-1) > _FG_DISTANCE
    if candidates.mean() < _MIN_AREA:
        return result
    fg = np.median(rgb[candidates], axis=0)
    axis = fg - bg
    coverage = np.clip((rgb - bg) @ axis / float(axis @ axis), 0.0, 1.0)
    region = _largest_component(coverage > 0.5)
    rows, cols = np.nonzero(region)
    bbox_area = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    scores = _shape_scores(region)
    nearest = max(scores, key=scores.get)
    result.update(
        color=_nearest(np.median(rgb[region], axis=0), COLORS),
        color_rgb=np.median(rgb[region], axis=0).round().tolist(),
        shape=open_set_shape(scores) if open_set else nearest,
        nearest_shape=nearest,
        area=float(region.mean()),
        fill_ratio=float(region.sum() / bbox_area),
        shape_scores=scores,
    )
    return result


def parse_prompt(prompt: str, colors: Collection[str] = tuple(COLORS)) -> dict[str, str | None]:
    """Colour, shape and background named by a prompt like "a red circle on a white background".

    The background is the colour word right before "background"; the shape is the first
    known shape word; the colour is the last of ``colors`` (the analyser's palette unless
    said) before the shape. Missing attributes are None.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    parsed: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    if "background" in words and words.index("background") > 0:
        before = words[words.index("background") - 1]
        parsed["background"] = before if before in BACKGROUNDS else None
    shape_positions = [i for i, word in enumerate(words) if word in ALL_SHAPES]
    if shape_positions:
        parsed["shape"] = words[shape_positions[0]]
        named = [word for word in words[: shape_positions[0]] if word in colors]
        parsed["color"] = named[-1] if named else None
    return parsed


def attribute_matches(
    analysis: dict, parsed: dict[str, str | None], open_set: bool = True
) -> dict[str, bool]:
    """For each attribute the prompt names, whether the analysis agrees (the shape by the
    open-set call, or with ``open_set=False`` by the nearest template)."""
    read = analysis if open_set else {**analysis, "shape": analysis["nearest_shape"]}
    return {key: read[key] == value for key, value in parsed.items() if value is not None}


def prompt_accuracies(images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
    """``prompt_accuracy`` (open-set shape call) and ``prompt_accuracy_lenient`` (nearest
    template): fractions of images whose colour, shape and background all match their prompt."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    analyses = [(analyse_image(image), parse_prompt(prompt)) for image, prompt in zip(images, prompts)]
    out = {}
    for key, open_set in (("prompt_accuracy", True), ("prompt_accuracy_lenient", False)):
        hits = [all(attribute_matches(a, p, open_set).values()) for a, p in analyses]
        out[key] = float(np.mean(hits)) if hits else 0.0
    return out


def prompt_accuracy(images: Sequence[Image.Image], prompts: Sequence[str], open_set: bool = True) -> float:
    """Fraction of images whose analysed colour, shape and background all match their prompt
    (``open_set=False``: the lenient reading, shape = nearest template)."""
    key = "prompt_accuracy" if open_set else "prompt_accuracy_lenient"
    return prompt_accuracies(images, prompts)[key]
