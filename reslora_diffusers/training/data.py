"""Image-caption data for text-to-image training, with PIL and numpy only.

**Sources.** A ``datasets`` dataset (hub name, local copy of a hub repo, ``save_to_disk``
folder, or an ``imagefolder`` with ``metadata.jsonl``), or a folder whose captions are text
files beside the images (``photo.jpg`` + ``photo.txt``, the kohya-ss layout, with
``caption_extension=".txt"``). Every image is opened once up front: unreadable, corrupt or
empty files are skipped and named; a missing or empty caption is an error naming its file.

**Pixels.** EXIF orientation is applied (``original_size`` is the size after it); alpha is
composited over white (palette transparency too); 16-bit images are scaled to 8 bits
(``v / 257``), since PIL's own conversion clips them.

**Buckets.** An image of height ``h`` and width ``w`` goes to the bucket ``(bh, bw)`` nearest in
log aspect ratio, ``argmin |log(h / w) - log(bh / bw)|`` (ties: the first bucket listed); it is
resized by ``s = max(bh / h, bw / w)`` to cover the bucket, flipped (``random_flip``, one
chance in two) and cropped to ``bh x bw``, centred (``top = round((h s - bh) / 2)``) or at a
random place (``random_crop``). ``crop_top_left`` is the crop's (top, left) in the resized,
flipped image, as diffusers' ``train_text_to_image_sdxl.py`` records it (it flips before it
crops). Without buckets there is one, ``resolution x resolution``.

**Order.** :class:`BucketBatchSampler` draws each epoch's batches from ``(seed, epoch)`` alone:
every batch holds images of one bucket, and each image gets an augmentation seed from
``(seed, epoch, position)`` (flip, crop, caption choice, caption dropout), so a resumed run sees
exactly the batches of an uninterrupted one, in one process or several.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..objectives import tokenize
from ..utils.errors import one_line

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: the widest aspect ratio of an ``auto`` bucket (1:4 and 4:1, as SDXL's training buckets)
AUTO_MAX_RATIO = 4.0
#: PIL modes with an alpha channel (composited over white)
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
#: PIL's 16- and 32-bit integer modes (scaled to 8 bits)
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
#: skipped files named in full in the start-up line; the rest are counted
NAMED_SKIPS = 20


@dataclass
class ImageCaptions:
    """Readable images (a path or encoded bytes each), their captions and sizes."""

    sources: list[str | bytes]
    captions: list[str | list[str]]
    #: ``(height, width)`` of each image as loaded, after EXIF orientation
    sizes: list[tuple[int, int]]
    #: ``"<file>: <why>"`` for each image that was skipped
    skipped_files: list[str]
    origin: str

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)


def load_image_captions(
    dataset_name: str | None,
    train_data_dir: str | Path | None,
    image_column: str,
    caption_column: str,
    max_train_samples: int | None = None,
    seed: int = 0,
    revision: str | None = None,
    caption_extension: str | None = None,
) -> ImageCaptions:
    """Load the training set and check it; raises ``ValueError`` naming what is wrong.

    ``caption_extension`` (e.g. ``".txt"``) reads each image's caption from the file of that
    extension beside it instead of ``metadata.jsonl`` (``train_data_dir`` only)."""
    if max_train_samples is not None and max_train_samples <= 0:
        raise ValueError(f"--max_train_samples {max_train_samples} must be > 0")
    if caption_extension is not None:
        if dataset_name is not None:
            raise ValueError("--caption_extension reads caption files beside the images of --train_data_dir")
        rows, origin = _caption_file_rows(Path(train_data_dir), caption_extension)
        if max_train_samples is not None:
            order = np.random.default_rng(seed).permutation(len(rows))[:max_train_samples]
            rows = [rows[i] for i in order]
        return _check_rows(rows, origin)
    rows, origin = _dataset_rows(
        dataset_name, train_data_dir, image_column, caption_column, max_train_samples, seed, revision
    )
    return _check_rows(rows, origin)


def _check_rows(rows: list[tuple[str | bytes | None, str, object]], origin: str) -> ImageCaptions:
    """``rows``: (source or None for a missing file, name, caption or an error string)."""
    sources, captions, sizes, bad = [], [], [], []
    for source, name, caption in rows:
        size, error = (None, "no such file") if source is None else inspect_image(source)
        if error:
            bad.append(f"{name}: {error}")
            continue
        sources.append(source)
        captions.append(caption)
        sizes.append(size)
    if bad:
        logger.warning("skipped %d unreadable or corrupt image(s) of %s: %s", len(bad), origin, _named(bad))
    if not sources:
        raise ValueError(f"no readable images in {origin}" + (f" ({len(bad)} corrupt)" if bad else ""))
    return ImageCaptions(sources, captions, sizes, bad, origin)


def _named(items: list[str]) -> str:
    shown = "; ".join(items[:NAMED_SKIPS])
    return shown + (f"; and {len(items) - NAMED_SKIPS} more" if len(items) > NAMED_SKIPS else "")


def _dataset_rows(
    dataset_name, train_data_dir, image_column, caption_column, max_train_samples, seed, revision
):
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
    rows = []
    for number, record in enumerate(dataset, start=1):
        name = record[image_column].get("path") or f"row {number} of {origin}"
        caption = _check_caption(record[caption_column], caption_column, name)
        rows.append((_source(record[image_column]), name, caption))
    return rows, origin


def check_caption_extension(extension: str) -> None:
    """Refuse a ``--caption_extension`` that is not a file extension such as ``.txt``."""
    if not extension.startswith(".") or len(extension) < 2:
        raise ValueError(f"--caption_extension {extension!r} must be a file extension such as .txt")


def read_caption_file(sample: Path, text_file: Path, extension: str) -> str:
    """The caption of ``sample`` (an image, a clip or a frame folder) in ``text_file``, stripped;
    a missing, non-UTF-8 or empty file is refused naming it."""
    if not text_file.is_file():
        raise ValueError(f"{sample}: no caption file {text_file.name} (--caption_extension {extension})")
    try:
        caption = text_file.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as err:
        raise ValueError(f"{text_file}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not caption:
        raise ValueError(f"{text_file}: the caption of {sample.name} is empty")
    return caption


def _caption_file_rows(data_dir: Path, extension: str) -> tuple[list, str]:
    """Every image under ``data_dir`` (sorted) with the text of ``<image stem><extension>``."""
    check_caption_extension(extension)
    if not data_dir.is_dir():
        raise ValueError(f"--train_data_dir: folder {data_dir} does not exist")
    images = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise ValueError(f"--train_data_dir: no images in {data_dir}")
    rows = [
        (str(image), str(image), read_caption_file(image, image.with_suffix(extension), extension))
        for image in images
    ]
    return rows, f"folder {data_dir}"


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
            raise ValueError(f"--dataset_name: could not load {dataset_name!r}: {one_line(err)}") from err
    data_dir = Path(train_data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"--train_data_dir: folder {data_dir} does not exist")
    images = [p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise ValueError(f"--train_data_dir: no images in {data_dir}")
    _check_metadata_rows(data_dir, images)
    try:
        with datasets_progress_off():
            dataset = load_dataset("imagefolder", data_dir=str(data_dir), split="train")
    except (OSError, ValueError, DatasetGenerationError) as err:
        raise ValueError(f"--train_data_dir: could not read {data_dir}: {one_line(err)}") from err
    return dataset, f"folder {data_dir}"


def metadata_records(metadata: Path) -> Iterator[tuple[int, object]]:
    """``(row number, parsed JSON)`` of each non-blank line of a ``metadata.jsonl``; a file that
    is not UTF-8 or a row that is not JSON is refused naming it."""
    try:
        lines = metadata.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"--train_data_dir: {metadata} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--train_data_dir: {metadata} row {number} is not JSON ({err})") from err


def leaves_folder(file_name: str) -> bool:
    """Whether a metadata row's relative ``file_name`` points outside its folder (absolute, or
    through ``..``)."""
    return Path(file_name).is_absolute() or ".." in Path(file_name).parts


def _check_metadata_rows(data_dir: Path, images: list[Path]) -> None:
    """Name what ``imagefolder`` fails on with a generic error or passes over in silence: a
    ``metadata.jsonl`` that is not UTF-8, a row that is not JSON, a ``file_name`` that leaves the
    folder, and an image with no row (it would have no caption)."""
    metadata = data_dir / "metadata.jsonl"
    if not metadata.is_file():
        return
    # imagefolder also reads metadata files in subfolders, each naming files beside it
    nested = any(p.parent != data_dir for p in data_dir.rglob("metadata.jsonl"))
    listed = set()
    for number, row in metadata_records(metadata):
        name = row.get("file_name") if isinstance(row, dict) else None
        if isinstance(name, str) and leaves_folder(name):
            raise ValueError(
                f"--train_data_dir: {metadata} row {number}: file_name {name!r} points outside {data_dir}"
            )
        if isinstance(name, str):
            listed.add(Path(name).as_posix())
    unlisted = sorted(p.relative_to(data_dir).as_posix() for p in images) if listed and not nested else []
    unlisted = [name for name in unlisted if name not in listed]
    if unlisted:
        raise ValueError(
            f"--train_data_dir: {data_dir / unlisted[0]} has no caption: no row of {metadata} names it"
            + (f" ({len(unlisted) - 1} more images neither)" if len(unlisted) > 1 else "")
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


def _source(value) -> str | bytes | None:
    """An undecoded ``datasets`` image: prefer the file path, else its encoded bytes (None: neither,
    a row naming a missing file)."""
    if value.get("path") and os.path.isfile(value["path"]):
        return value["path"]
    return value.get("bytes")


def _check_caption(caption, column: str, name: str) -> str | list[str]:
    """A caption string or a list of them, none empty; ``ValueError`` naming the image otherwise."""
    if caption is None or (isinstance(caption, (str, list)) and not caption):
        raise ValueError(f"{name}: no caption (--caption_column {column!r} is empty)")
    texts = caption if isinstance(caption, list) else [caption]
    if not all(isinstance(c, str) for c in texts):
        raise ValueError(
            f"--caption_column {column!r} holds {caption!r}; it must hold strings or lists of strings"
        )
    if any(not c.strip() for c in texts):
        raise ValueError(f"{name}: empty caption in --caption_column {column!r}")
    return caption


# ----------------------------------------------------------------------------- pixels


def open_image(source: str | bytes) -> Image.Image:
    return Image.open(source if isinstance(source, str) else io.BytesIO(source))


def source_bytes(source: str | bytes) -> bytes:
    """The encoded image (the file's bytes for a path)."""
    return Path(source).read_bytes() if isinstance(source, str) else source


def inspect_image(source: str | bytes) -> tuple[tuple[int, int] | None, str | None]:
    """``((height, width) after EXIF orientation, None)`` if the image decodes completely, else
    ``(None, reason)``."""
    if isinstance(source, str) and os.path.getsize(source) == 0:
        return None, "empty file (0 bytes)"
    try:
        image = load_image(source)
    except Exception as err:  # PIL raises many types for bad files
        return None, one_line(err)
    return (image.height, image.width), None


def load_image(source: str | bytes) -> Image.Image:
    """The image upright (EXIF orientation applied), as 8-bit RGB: alpha (and palette
    transparency) composited over white, 16- and 32-bit integer images scaled by ``1 / 257``."""
    with open_image(source) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
    return rgb(image)


def rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB (:func:`load_image`'s conversions; a video clip's frames too)."""
    if image.mode in WIDE_MODES:
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


@dataclass(frozen=True)
class CropPlan:
    """How one image becomes a training crop, in the terms of SDXL's micro-conditioning."""

    #: ``(height, width)`` as loaded (after EXIF orientation)
    original_size: tuple[int, int]
    #: ``(height, width)`` after resizing to cover the bucket
    resized_size: tuple[int, int]
    #: ``(top, left)`` of the crop in the resized image, mirrored first when ``flip``
    crop_top_left: tuple[int, int]
    #: ``(height, width)`` of the crop: the bucket
    target_size: tuple[int, int]
    flip: bool


def plan_crop(
    original_size: tuple[int, int],
    target_size: tuple[int, int],
    flip: bool,
    random_crop: bool = False,
    rng: np.random.Generator | None = None,
) -> CropPlan:
    """Resize to cover ``target_size`` (``s = max(th / h, tw / w)``), then a centred crop
    (``round((H - th) / 2)``, diffusers' rounding) or a random one drawn from ``rng``."""
    (h, w), (th, tw) = original_size, target_size
    scale = max(th / h, tw / w)
    resized = (max(th, round(h * scale)), max(tw, round(w * scale)))
    if random_crop:
        top, left = int(rng.integers(0, resized[0] - th + 1)), int(rng.integers(0, resized[1] - tw + 1))
    else:
        top, left = int(round((resized[0] - th) / 2.0)), int(round((resized[1] - tw) / 2.0))
    return CropPlan(original_size, resized, (top, left), target_size, flip)


def crop_pixels(image: Image.Image, plan: CropPlan) -> torch.Tensor:
    """The (3, th, tw) float tensor in [-1, 1] of ``plan`` applied to an RGB ``image``."""
    (rh, rw), (top, left), (th, tw) = plan.resized_size, plan.crop_top_left, plan.target_size
    if image.size != (rw, rh):
        image = image.resize((rw, rh), Image.Resampling.BILINEAR)
    if plan.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = image.crop((left, top, left + tw, top + th))
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- buckets


def parse_buckets(text: str) -> list[tuple[int, int]]:
    """``"h1,w1;h2,w2;..."`` (diffusers' ``--aspect_ratio_buckets``) -> ``[(h1, w1), ...]``,
    duplicates dropped; ``ValueError`` naming a malformed pair."""
    buckets = []
    for pair in text.split(";"):
        parts = [p.strip() for p in pair.split(",")]
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(
                f"--aspect_ratio_buckets: {pair.strip()!r} is not 'height,width' in positive pixels "
                "(e.g. '512,512;448,576;576,448' or 'auto')"
            )
        bucket = (int(parts[0]), int(parts[1]))
        if bucket not in buckets:
            buckets.append(bucket)
    return buckets


def auto_buckets(resolution: int, step: int, max_ratio: float = AUTO_MAX_RATIO) -> list[tuple[int, int]]:
    """Buckets of at most ``resolution**2`` pixels, sides multiples of ``step``: for each width
    ``w`` the largest height ``h`` with ``h w <= resolution**2``, both orientations, aspect ratios
    up to ``max_ratio``; sorted by aspect ratio (tall first). Includes the square when
    ``resolution`` is a multiple of ``step``."""
    area = resolution * resolution
    found = set()
    for w in range(step, int(max_ratio * resolution) + step, step):
        h = area // w // step * step
        if h >= step and max(h / w, w / h) <= max_ratio:
            found.update({(h, w), (w, h)})
    if not found:
        raise ValueError(f"--resolution {resolution} holds no bucket with sides multiples of {step} px")
    return sorted(found, key=lambda b: (-b[0] / b[1], -b[0] * b[1]))


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket nearest ``size`` (h, w) in log aspect ratio (the first on a tie)."""
    ratio = math.log(size[0] / size[1])
    distances = [abs(ratio - math.log(h / w)) for h, w in buckets]
    return distances.index(min(distances))


# ----------------------------------------------------------------------------- dataset


class TextImageDataset(torch.utils.data.Dataset):
    """Items indexed by ``(index, augmentation seed)``:

    * ``pixel_values`` (3, bh, bw), or with a latent cache ``latent_parameters`` (the VAE's
      posterior parameters, 2 C x bh/f x bw/f);
    * ``caption`` (``""`` with probability ``caption_dropout_rate``), ``input_ids`` with a
      ``tokenizer`` (pipelines with several tokenizers tokenize per encoder), and with a text
      cache ``text_conditioning`` (the denoiser's text inputs, a dict of tensors);
    * ``original_size``, ``crop_top_left``, ``target_size`` (:class:`CropPlan`).
    """

    def __init__(
        self,
        data: ImageCaptions,
        tokenizer,
        buckets: list[tuple[int, int]],
        random_crop: bool = False,
        random_flip: bool = False,
        caption_dropout_rate: float = 0.0,
    ):
        self.data = data
        self.tokenizer = tokenizer
        self.buckets = list(buckets)
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.caption_dropout_rate = caption_dropout_rate
        #: the bucket index of every image
        self.bucket_of = [nearest_bucket(size, self.buckets) for size in data.sizes]
        self.latent_cache = None
        self.text_cache = None

    def __len__(self) -> int:
        return len(self.data.sources)

    def use_caches(self, latent_cache=None, text_cache=None) -> None:
        """Read latents (``latent_cache.load(index, plan)``) and text conditioning
        (``text_cache.load(caption)``) from caches instead of computing them per step."""
        self.latent_cache, self.text_cache = latent_cache, text_cache

    def plan(self, index: int, rng: np.random.Generator | None = None, flip: bool | None = None) -> CropPlan:
        """The crop of image ``index``: ``flip`` given, or drawn from ``rng`` (``random_flip``),
        then the crop position (random from ``rng`` with ``random_crop``)."""
        if flip is None:
            flip = bool(self.random_flip and rng.random() < 0.5)
        size, target = self.data.sizes[index], self.buckets[self.bucket_of[index]]
        return plan_crop(size, target, flip, self.random_crop, rng)

    def cached_plans(self, index: int) -> list[CropPlan]:
        """The crops a latent cache holds for image ``index``: the centred one, and its mirror
        with ``random_flip`` (random crops cannot be cached)."""
        return [self.plan(index, flip=flip) for flip in ((False, True) if self.random_flip else (False,))]

    def pixels(self, index: int, plan: CropPlan) -> torch.Tensor:
        return crop_pixels(load_image(self.data.sources[index]), plan)

    def caption_choices(self) -> set[str]:
        """Every caption an item can carry (``""`` too when captions are dropped)."""
        texts = {t for c in self.data.captions for t in (c if isinstance(c, list) else [c])}
        return texts | ({""} if self.caption_dropout_rate > 0 else set())

    def caption(self, index: int, rng: np.random.Generator) -> str:
        """One of the image's captions, or ``""`` with probability ``caption_dropout_rate``."""
        caption = self.data.captions[index]
        if isinstance(caption, list):
            caption = caption[int(rng.integers(len(caption)))]
        if self.caption_dropout_rate > 0 and rng.random() < self.caption_dropout_rate:
            return ""
        return caption

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, aug_seed = key
        rng = np.random.default_rng(aug_seed)
        plan = self.plan(index, rng)
        item = {
            "original_size": plan.original_size,
            "crop_top_left": plan.crop_top_left,
            "target_size": plan.target_size,
        }
        if self.latent_cache is not None:
            item["latent_parameters"] = self.latent_cache.load(index, plan)
        else:
            item["pixel_values"] = self.pixels(index, plan)
        item["caption"] = self.caption(index, rng)
        if self.tokenizer is not None:
            item["input_ids"] = tokenize(self.tokenizer, [item["caption"]])[0]
        if self.text_cache is not None:
            item["text_conditioning"] = self.text_cache.load(item["caption"])
        return item


def describe(dataset: TextImageDataset) -> list[str]:
    """Start-up lines: one per bucket with images (size, count), and the skipped images."""
    counts = Counter(dataset.bucket_of)
    lines = [
        f"bucket {h}x{w} (height x width): {counts[b]} image(s)"
        for b, (h, w) in enumerate(dataset.buckets)
        if counts[b]
    ]
    empty = len(dataset.buckets) - len(counts)
    if empty:
        lines.append(f"{empty} other bucket(s) hold no image")
    skipped = dataset.data.skipped_files
    lines.append(f"skipped {len(skipped)} image(s)" + (f": {_named(skipped)}" if skipped else ""))
    return lines


def collate(items: list[dict]) -> dict:
    """Stack the tensors of items of one bucket; sizes become lists ``original_sizes``,
    ``crop_top_lefts``, ``target_sizes`` (diffusers' SDXL names)."""
    batch = {
        "captions": [i["caption"] for i in items],
        "original_sizes": [i["original_size"] for i in items],
        "crop_top_lefts": [i["crop_top_left"] for i in items],
        "target_sizes": [i["target_size"] for i in items],
    }
    for name in ("pixel_values", "latent_parameters", "input_ids"):
        if name in items[0]:
            batch[name] = torch.stack([i[name] for i in items])
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].float()
    if "text_conditioning" in items[0]:
        batch["text_conditioning"] = {
            k: torch.stack([i["text_conditioning"][k] for i in items]) for k in items[0]["text_conditioning"]
        }
    return batch


class BucketBatchSampler(torch.utils.data.Sampler):
    """Each epoch, a permutation of the images from ``(seed, epoch)`` alone, cut per bucket into
    batches of ``batch_size`` (a bucket's last batch may be smaller), the batches in an order
    drawn from the same seed, smaller batches last; each key is ``(index, augmentation seed)``,
    the seed from ``(seed, epoch, position in the epoch)``. Call :meth:`start_epoch` every epoch.

    (Not ``set_epoch``: accelerate calls that with its own count of iterations, which restarts
    at 0 for the loader that skips the batches already seen after a resume. No ``batch_size``
    attribute either: accelerate then shards whole batches across processes, never mixing two.)"""

    def __init__(self, bucket_of: list[int], batch_size: int, seed: int) -> None:
        self.bucket_of = list(bucket_of)
        self.per_batch = batch_size
        self.seed = seed
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(math.ceil(n / self.per_batch) for n in Counter(self.bucket_of).values())

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        entropy = np.random.SeedSequence([self.seed, self.epoch])
        rng = np.random.default_rng(entropy)
        order = rng.permutation(len(self.bucket_of)).tolist()
        batches = []
        for bucket in sorted(set(self.bucket_of)):
            members = [i for i in order if self.bucket_of[i] == bucket]
            batches += [members[s : s + self.per_batch] for s in range(0, len(members), self.per_batch)]
        aug_seeds = entropy.generate_state(len(order), dtype=np.uint64).tolist()
        shuffled = [batches[b] for b in rng.permutation(len(batches)).tolist()]
        # full batches first: a compiled denoiser sees a new batch shape only at the epoch's end
        shuffled.sort(key=lambda batch: len(batch) < self.per_batch)
        position = 0
        for batch in shuffled:
            yield [(index, aug_seeds[position + k]) for k, index in enumerate(batch)]
            position += len(batch)
