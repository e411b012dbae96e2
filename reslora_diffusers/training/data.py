"""Image-caption data for text-to-image training, with PIL and numpy only.

The set is a ``datasets`` dataset (hub name, local copy of a hub repo, ``save_to_disk``
folder, or an ``imagefolder`` with ``metadata.jsonl``). Every image is opened once up front:
unreadable or corrupt files are skipped with one warning that counts them. Shuffling and
augmentation (random crop, flip) depend only on ``(seed, epoch, position)``, so a resumed run
sees exactly the batches that an uninterrupted run sees, in one process or several.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class ImageCaptions:
    """Readable images (a path or encoded bytes each) and their captions."""

    sources: list[str | bytes]
    captions: list[str | list[str]]
    skipped: int
    origin: str


def load_image_captions(
    dataset_name: str | None,
    train_data_dir: str | Path | None,
    image_column: str,
    caption_column: str,
    max_train_samples: int | None = None,
    seed: int = 0,
    revision: str | None = None,
) -> ImageCaptions:
    """Load the training set and check it; raises ``ValueError`` naming what is wrong."""
    from datasets import Image as ImageFeature

    dataset, origin = _load_dataset(dataset_name, train_data_dir, revision)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in dataset.column_names:
            raise ValueError(
                f"{flag} {column!r} is not a column of {origin}; its columns are {dataset.column_names}"
            )
    if max_train_samples is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(max_train_samples, len(dataset))))
    dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    sources, captions, bad = [], [], []
    for record in dataset:
        source = _source(record[image_column])
        error = f"{record[image_column].get('path')}: no such file" if source is None else _unreadable(source)
        if error:
            bad.append(error)
            continue
        sources.append(source)
        captions.append(_check_caption(record[caption_column], caption_column))
    if bad:
        logger.warning("skipped %d unreadable or corrupt image(s) of %s; first: %s", len(bad), origin, bad[0])
    if not sources:
        raise ValueError(f"no readable images in {origin}" + (f" ({len(bad)} corrupt)" if bad else ""))
    return ImageCaptions(sources, captions, len(bad), origin)


def _load_dataset(dataset_name: str | None, train_data_dir: str | Path | None, revision: str | None):
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    from .quiet import datasets_progress_off

    if dataset_name is not None:
        # a hub id is "name" or "owner/name"; anything else that is not there is a missing path
        looks_local = dataset_name.startswith((".", "/", "~")) or dataset_name.count("/") > 1
        local = Path(dataset_name).expanduser()
        if looks_local and not local.exists():
            raise ValueError(f"--dataset_name: path {dataset_name} does not exist")
        name = str(local) if local.exists() else dataset_name
        try:
            if _saved_to_disk(local):
                return _load_saved(local), f"dataset {dataset_name}"
            return load_dataset(name, revision=revision, split="train"), f"dataset {dataset_name}"
        except (OSError, ValueError, FileNotFoundError) as err:
            raise ValueError(f"--dataset_name: could not load {dataset_name!r}: {_one_line(err)}") from err
    data_dir = Path(train_data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"--train_data_dir: folder {data_dir} does not exist")
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in data_dir.rglob("*")):
        raise ValueError(f"--train_data_dir: no images in {data_dir}")
    _check_metadata_rows(data_dir)
    try:
        with datasets_progress_off():
            dataset = load_dataset("imagefolder", data_dir=str(data_dir), split="train")
    except (OSError, ValueError, DatasetGenerationError) as err:
        raise ValueError(f"--train_data_dir: could not read {data_dir}: {_one_line(err)}") from err
    return dataset, f"folder {data_dir}"


def _check_metadata_rows(data_dir: Path) -> None:
    """Name the first row of ``metadata.jsonl`` that is not JSON or whose ``file_name`` leaves
    the folder (``imagefolder`` fails on those with a generic error)."""
    metadata = data_dir / "metadata.jsonl"
    if not metadata.is_file():
        return
    for number, line in enumerate(metadata.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--train_data_dir: {metadata} row {number} is not JSON ({err})") from err
        name = row.get("file_name") if isinstance(row, dict) else None
        if isinstance(name, str) and (Path(name).is_absolute() or ".." in Path(name).parts):
            raise ValueError(
                f"--train_data_dir: {metadata} row {number}: file_name {name!r} points outside {data_dir}"
            )


def _saved_to_disk(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (which
    ``load_dataset`` cannot read), rather than a hub-style repo of data files."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _load_saved(path: Path):
    """Its ``train`` split (a lone ``Dataset`` is taken whole)."""
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"{path} has no 'train' split; its splits are {list(dataset)}")
        dataset = dataset["train"]
    return dataset


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _source(value) -> str | bytes | None:
    """An undecoded ``datasets`` image: prefer the file path, else its encoded bytes (None: neither,
    a row naming a missing file)."""
    if value.get("path") and os.path.isfile(value["path"]):
        return value["path"]
    return value.get("bytes")


def open_image(source: str | bytes) -> Image.Image:
    return Image.open(source if isinstance(source, str) else io.BytesIO(source))


def _unreadable(source: str | bytes) -> str | None:
    """None if the image decodes completely, else ``"<name>: <reason>"``."""
    try:
        with open_image(source) as image:
            image.load()
    except Exception as err:  # PIL raises many types for bad files
        name = source if isinstance(source, str) else f"<{len(source)} bytes>"
        return f"{name}: {_one_line(err)}"
    return None


def _check_caption(caption, column: str) -> str | list[str]:
    if isinstance(caption, str) or (
        isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption)
    ):
        return caption
    raise ValueError(
        f"--caption_column {column!r} holds {caption!r}; it must hold strings or lists of strings"
    )


def preprocess(
    image: Image.Image, resolution: int, center_crop: bool, random_flip: bool, rng: np.random.Generator
) -> torch.Tensor:
    """Resize the short side to ``resolution``, crop a square (centre or random), maybe flip;
    return a (3, resolution, resolution) float tensor in [-1, 1]."""
    image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    if scale != 1:
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    width, height = image.size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left, top = (
            int(rng.integers(0, width - resolution + 1)),
            int(rng.integers(0, height - resolution + 1)),
        )
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


class TextImageDataset(torch.utils.data.Dataset):
    """Items ``{"pixel_values", "caption", "input_ids"}``, indexed by ``(index, augmentation seed)``
    (``input_ids`` only with a ``tokenizer``: pipelines with several tokenizers tokenize per encoder)."""

    def __init__(self, data: ImageCaptions, tokenizer, resolution: int, center_crop: bool, random_flip: bool):
        self.data = data
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.data.sources)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, aug_seed = key
        rng = np.random.default_rng(aug_seed)
        with open_image(self.data.sources[index]) as image:
            pixels = preprocess(image, self.resolution, self.center_crop, self.random_flip, rng)
        caption = self.data.captions[index]
        if isinstance(caption, list):
            caption = caption[int(rng.integers(len(caption)))]
        item = {"pixel_values": pixels, "caption": caption}
        if self.tokenizer is not None:
            item["input_ids"] = tokenize(self.tokenizer, [caption])[0]
        return item


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions,
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids


def collate(items: list[dict]) -> dict:
    batch = {
        "pixel_values": torch.stack([i["pixel_values"] for i in items]).float(),
        "captions": [i["caption"] for i in items],
    }
    if "input_ids" in items[0]:
        batch["input_ids"] = torch.stack([i["input_ids"] for i in items])
    return batch


class EpochSampler(torch.utils.data.Sampler):
    """A permutation per epoch drawn from ``(seed, epoch)`` alone, each index paired with an
    augmentation seed from ``(seed, epoch, position)``; call :meth:`start_epoch` every epoch.

    (Not ``set_epoch``: accelerate calls that with its own count of iterations, which restarts
    at 0 for the loader that skips the batches already seen after a resume.)"""

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[tuple[int, int]]:
        entropy = np.random.SeedSequence([self.seed, self.epoch])
        order = np.random.default_rng(entropy).permutation(self.num_items)
        aug_seeds = entropy.generate_state(self.num_items, dtype=np.uint64)
        for position, index in enumerate(order.tolist()):
            yield index, int(aug_seeds[position])
