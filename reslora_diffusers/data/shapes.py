"""Procedural coloured-shape images: the palette, the shapes and a renderer.

Every image shows one flat-coloured shape on a flat background, drawn at 4x and
box-downsampled so edges are anti-aliased. Captions read
"a red circle on a white background".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

#: Shape colours of the base set (RGB).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (150, 40, 200),
}
#: Shape colours that only a pretraining run's ``--extra-colors`` adds (RGB), each drawn on every
#: base shape: more colours per shape, so that a colour word is learnt apart from the shapes it
#: appears on. The evaluation, the analyser and the fine-tuning set know :data:`COLORS` only.
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {
    "orange": (240, 120, 20),
    "cyan": (20, 190, 200),
    "pink": (240, 110, 170),
    "brown": (130, 80, 30),
}
#: Every colour a shape may be drawn in, for the sampler
_SHAPE_RGB = {**COLORS, **EXTRA_COLORS}
#: Background colours (RGB); disjoint from the shape colours.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
#: Shapes of the base set.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: The fine-tuning concept: a shape the base set never shows.
FINETUNE_SHAPE = "cross"
#: Every shape the renderer and the analyser know.
ALL_SHAPES: tuple[str, ...] = (*SHAPES, FINETUNE_SHAPE)

#: Default image side in pixels.
RESOLUTION = 32
_SUPERSAMPLE = 4
#: Shape side as a fraction of the image side, sampled uniformly in this range.
SIZE_RANGE = (0.35, 0.65)
#: Free border (fraction of the image side) that a shape never enters.
MARGIN = 0.06
#: Per-channel colour jitter (+-) applied to shape and background.
COLOR_JITTER = 10


def caption(color: str, shape: str, background: str) -> str:
    """The caption of one image, e.g. "a red circle on a white background"."""
    return f"a {color} {shape} on a {background} background"


def _shape_polygons(shape: str, box: tuple[float, float, float, float]) -> list[list[tuple[float, float]]]:
    """Polygons (or one ellipse box for "circle") filling the square ``box``."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "square":
        return [[(x0, y0), (x1, y0), (x1, y1), (x0, y1)]]
    if shape == "triangle":
        return [[(x0, y1), (x1, y1), (cx, y0)]]
    if shape == "cross":
        half = (x1 - x0) / 6
        return [
            [(x0, cy - half), (x1, cy - half), (x1, cy + half), (x0, cy + half)],
            [(cx - half, y0), (cx + half, y0), (cx + half, y1), (cx - half, y1)],
        ]
    raise ValueError(f"unknown shape {shape!r}; known: {ALL_SHAPES}")


def draw_shape_mask(shape: str, resolution: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` filling ``box`` (pixel units), shape (res, res)."""
    big = Image.new("L", (resolution * _SUPERSAMPLE, resolution * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    scaled = tuple(v * _SUPERSAMPLE for v in box)
    if shape == "circle":
        draw.ellipse(scaled, fill=255)
    else:
        for polygon in _shape_polygons(shape, scaled):
            draw.polygon(polygon, fill=255)
    return np.asarray(big.reduce(_SUPERSAMPLE), dtype=np.float32) / 255.0


def render(
    shape: str,
    color: str,
    background: str,
    *,
    size: float = 0.5,
    center: tuple[float, float] = (0.5, 0.5),
    resolution: int = RESOLUTION,
    color_rgb: tuple[int, int, int] | None = None,
    background_rgb: tuple[int, int, int] | None = None,
) -> Image.Image:
    """Render one RGB image of a ``color`` ``shape`` on a ``background``.

    ``size`` is the shape's side and ``center`` its centre (x, y), both as fractions of
    the image side. ``color_rgb``/``background_rgb`` override the palette values (used
    for colour jitter).
    """
    if shape not in ALL_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {ALL_SHAPES}")
    fg = np.array(color_rgb if color_rgb is not None else COLORS[color], dtype=np.float32)
    bg = np.array(background_rgb if background_rgb is not None else BACKGROUNDS[background], dtype=np.float32)
    half = size * resolution / 2
    cx, cy = center[0] * resolution, center[1] * resolution
    coverage = draw_shape_mask(shape, resolution, (cx - half, cy - half, cx + half, cy + half))[..., None]
    pixels = coverage * fg + (1.0 - coverage) * bg
    return Image.fromarray(np.round(pixels).astype(np.uint8), mode="RGB")


@dataclass(frozen=True)
class ShapeSample:
    """One rendered image with its attributes."""

    image: Image.Image
    color: str
    shape: str
    background: str

    @property
    def text(self) -> str:
        """The caption."""
        return caption(self.color, self.shape, self.background)


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    noise = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(rgb) + noise, 0, 255))


def random_sample(
    rng: np.random.Generator, color: str, shape: str, background: str, resolution: int = RESOLUTION
) -> ShapeSample:
    """Render ``color`` (of :data:`COLORS` or :data:`EXTRA_COLORS`)/``shape``/``background`` at a
    random size and position, with colour jitter."""
    size = rng.uniform(*SIZE_RANGE)
    low, high = MARGIN + size / 2, 1.0 - MARGIN - size / 2
    center = (rng.uniform(low, high), rng.uniform(low, high))
    image = render(
        shape,
        color,
        background,
        size=size,
        center=center,
        resolution=resolution,
        color_rgb=_jitter(rng, _SHAPE_RGB[color]),
        background_rgb=_jitter(rng, BACKGROUNDS[background]),
    )
    return ShapeSample(image=image, color=color, shape=shape, background=background)
