"""Image-caption sets in the ``imagefolder`` layout, and the evaluation prompts.

A set is a folder of PNGs plus ``metadata.jsonl`` with one JSON line per image
(``file_name``, ``text`` and the ground-truth ``color``/``shape``/``background``), so it
loads with ``datasets.load_dataset("imagefolder", data_dir=...)`` like a user's data.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .shapes import (
    BACKGROUNDS,
    COLORS,
    EXTRA_COLORS,
    FINETUNE_SHAPE,
    RESOLUTION,
    SHAPES,
    ShapeSample,
    caption,
    random_sample,
)

#: Colour x shape combinations that the base set never shows (one per shape and colour),
#: used to measure compositional generalisation.
HELDOUT_COMBOS: tuple[tuple[str, str], ...] = (("red", "triangle"), ("green", "square"), ("blue", "circle"))
#: Seed and size of the embedded fine-tuning set.
FINETUNE_SEED = 1234
FINETUNE_NUM_IMAGES = 150

_ASSETS = Path(__file__).resolve().parent.parent / "assets"


def extra_colors(count: int) -> tuple[str, ...]:
    """The first ``count`` of :data:`EXTRA_COLORS`, the pretraining-only shape colours."""
    if not 0 <= count <= len(EXTRA_COLORS):
        raise ValueError(
            f"extra colours {count}: choose 0 to {len(EXTRA_COLORS)} ({', '.join(EXTRA_COLORS)})"
        )
    return tuple(EXTRA_COLORS)[:count]


def base_combos(heldout: bool = False, num_extra_colors: int = 0) -> list[tuple[str, str]]:
    """(colour, shape) pairs of the base set, or only the held-out ones with ``heldout=True``;
    ``num_extra_colors`` adds that many of :data:`EXTRA_COLORS` on every base shape."""
    pairs = itertools.product(COLORS, SHAPES)
    combos = [pair for pair in pairs if (pair in HELDOUT_COMBOS) == heldout]
    if heldout:
        return combos
    return combos + list(itertools.product(extra_colors(num_extra_colors), SHAPES))


def _balanced_triplets(
    rng: np.random.Generator, combos: Sequence[tuple[str, str]], num_images: int
) -> list[tuple[str, str, str]]:
    """``num_images`` (colour, shape, background) triplets, as balanced as possible, shuffled."""
    triplets = [(c, s, b) for (c, s), b in itertools.product(combos, BACKGROUNDS)]
    order = [triplets[i % len(triplets)] for i in range(num_images)]
    return [order[i] for i in rng.permutation(num_images)]


def _samples(
    seed: int, combos: Sequence[tuple[str, str]], num_images: int, resolution: int
) -> Iterable[ShapeSample]:
    rng = np.random.default_rng(seed)
    for color, shape, background in _balanced_triplets(rng, combos, num_images):
        yield random_sample(rng, color, shape, background, resolution)


def write_imagefolder(out_dir: str | Path, samples: Iterable[ShapeSample]) -> Path:
    """Write ``samples`` as ``NNNNN.png`` files plus ``metadata.jsonl`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, sample in enumerate(samples):
        file_name = f"{index:05d}.png"
        sample.image.save(out / file_name)
        record = {"file_name": file_name, "text": sample.text}
        record.update(color=sample.color, shape=sample.shape, background=sample.background)
        lines.append(json.dumps(record))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out


def make_base_set(
    out_dir: str | Path, num_images: int, seed: int, resolution: int = RESOLUTION, num_extra_colors: int = 0
) -> Path:
    """Write the base set: every colour x shape x background except :data:`HELDOUT_COMBOS`, and
    with ``num_extra_colors`` that many pretraining-only colours on every shape (all pairs
    equally often)."""
    combos = base_combos(num_extra_colors=num_extra_colors)
    return write_imagefolder(out_dir, _samples(seed, combos, num_images, resolution))


def make_finetune_set(
    out_dir: str | Path,
    num_images: int = FINETUNE_NUM_IMAGES,
    seed: int = FINETUNE_SEED,
    resolution: int = RESOLUTION,
) -> Path:
    """Write the fine-tuning set: the :data:`FINETUNE_SHAPE` in every colour on every background."""
    combos = [(color, FINETUNE_SHAPE) for color in COLORS]
    return write_imagefolder(out_dir, _samples(seed, combos, num_images, resolution))


def default_base_model_path() -> Path:
    """The committed tiny text-to-image pipeline folder (``StableDiffusionPipeline`` layout)."""
    return _ASSETS / "tiny-sd"


def default_dit_base_path() -> Path:
    """The tiny diffusion-transformer base (``StableDiffusion3Pipeline`` layout), written by
    ``scripts/pretrain_tiny_base.py --family sd3`` (model card: its ``README.md``)."""
    return _ASSETS / "tiny-sd3"


def default_finetune_data_dir() -> Path:
    """The committed fine-tuning set (``make_finetune_set`` with its defaults), imagefolder layout."""
    return _ASSETS / "finetune-set"


def seen_base_prompts() -> list[str]:
    """Captions of every colour x shape x background combination the base set shows."""
    return [caption(c, s, b) for (c, s), b in itertools.product(base_combos(), BACKGROUNDS)]


def heldout_base_prompts() -> list[str]:
    """Captions of the held-out colour x shape combinations, on every background."""
    return [caption(c, s, b) for (c, s), b in itertools.product(HELDOUT_COMBOS, BACKGROUNDS)]


def finetune_prompts() -> list[str]:
    """Captions of the fine-tuning concept in every colour on every background."""
    return [caption(c, FINETUNE_SHAPE, b) for c, b in itertools.product(COLORS, BACKGROUNDS)]
