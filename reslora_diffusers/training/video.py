"""Video clips and their captions for text-to-video training, with PIL and numpy only.

**Clips.** An animated GIF, WebP or PNG (APNG) file, a folder of frames (its image files in
name order, numbers compared as numbers: ``frame_2`` before ``frame_10``), or a still image,
which is a one-frame video. These are what PIL decodes: no video codec is needed (torchvision,
PyAV and ffmpeg are not dependencies). MP4, WebM and other coded videos are not read; turn
them into frame folders or animated WebP first, at the model's frame rate (16 fps for Wan):
``ffmpeg -i clip.mp4 -vf fps=16 clip/%05d.png``. Frames are taken as stored, without
resampling to a frame rate.

**Captions.** Either ``metadata.jsonl`` in the data folder, one row per clip naming it in
``file_name`` (a clip file or a frame folder, relative to the data folder) and its caption in
the caption column (``text``, or a list of captions to draw from) — the ``imagefolder`` /
``videofolder`` layout of diffusers and finetrainers — or, with ``caption_extension`` (``.txt``),
a text file beside each clip: ``clip.gif`` + ``clip.txt``, ``clip/`` (frames) + ``clip.txt``,
``still.png`` + ``still.txt`` — the layout of kohya-ss, musubi-tuner and diffusion-pipe.

**Frames.** A clip trains on its first ``num_frames`` frames (``1 + k * step``, the VAE's
temporal factor ``step``: 4 for Wan); a shorter clip on the most it has of that form, a still
on one. Batches hold clips of one frame count and one spatial bucket; every frame of a clip
gets the same resize, crop and flip (:class:`~.data.CropPlan`). Every clip is opened once up
front and the frames it trains on decoded: an unreadable clip is skipped and named.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

from ..utils.errors import one_line
from .data import (
    IMAGE_EXTENSIONS,
    ImageCaptions,
    TextImageDataset,
    check_caption_extension,
    crop_pixels,
    leaves_folder,
    load_image,
    metadata_records,
    nearest_bucket,
    read_caption_file,
    rgb,
)

logger = logging.getLogger(__name__)

#: files whose frames PIL reads (a still of another image type is one frame)
ANIMATED_EXTENSIONS = (".gif", ".webp", ".png", ".apng")
CLIP_EXTENSIONS = tuple(sorted({*IMAGE_EXTENSIONS, *ANIMATED_EXTENSIONS}))
#: coded videos, named in the error for a folder that holds them
CODED_VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")


@dataclass
class VideoCaptions(ImageCaptions):
    """Readable clips (a file or a frame folder each), their captions, frame sizes (``(height,
    width)`` of the first frame) and frame counts."""

    frames: list[int] = field(default_factory=list)


def usable_frames(available: int, num_frames: int, step: int) -> int:
    """Frames a clip of ``available`` frames trains on: ``num_frames``, or the largest
    ``1 + k * step`` it has."""
    return min(num_frames, 1 + (available - 1) // step * step)


def check_num_frames(num_frames: int, step: int) -> None:
    """``num_frames`` must be ``1 + k * step`` (``ValueError`` naming the flag)."""
    if num_frames < 1 or (num_frames - 1) % step:
        raise ValueError(
            f"--num_frames {num_frames} must be 1 + a multiple of {step} (the VAE's temporal factor), "
            f"e.g. {1 + 4 * step} or {1 + 8 * step}"
        )


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def frame_files(folder: Path) -> list[Path]:
    """A frame folder's images, in name order with numbers compared as numbers."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=_natural)


def count_frames(source: str) -> int:
    path = Path(source)
    if path.is_dir():
        return len(frame_files(path))
    with Image.open(path) as image:
        return getattr(image, "n_frames", 1)


def read_frames(source: str, count: int) -> list[Image.Image]:
    """The first ``count`` frames of a clip as 8-bit RGB (as :func:`~.data.load_image` converts
    an image: alpha and palette transparency over white)."""
    path = Path(source)
    if path.is_dir():
        return [load_image(str(p)) for p in frame_files(path)[:count]]
    frames = []
    with Image.open(path) as video:
        for frame in ImageSequence.Iterator(video):
            if len(frames) == count:
                break
            frames.append(rgb(frame.copy()))
    if len(frames) < count:
        raise ValueError(f"{count} frames asked of a clip of {len(frames)}")
    return frames


def inspect_clip(source: str, num_frames: int, step: int) -> tuple[tuple[int, int] | None, int, str | None]:
    """``((height, width), frames, None)`` if the frames a clip trains on decode, else ``(None, 0, reason)``."""
    try:
        available = count_frames(source)
        if available == 0:
            return None, 0, "a frame folder with no images"
        first = read_frames(source, usable_frames(available, num_frames, step))[0]
    except Exception as err:  # PIL raises many types for bad files
        return None, 0, one_line(err)
    return (first.height, first.width), available, None


def load_video_captions(
    train_data_dir: str | Path,
    caption_column: str,
    num_frames: int,
    step: int,
    max_train_samples: int | None = None,
    seed: int = 0,
    caption_extension: str | None = None,
) -> VideoCaptions:
    """The clips of ``train_data_dir`` with their captions (module doc); ``ValueError`` naming
    what is wrong."""
    data_dir = Path(train_data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"--train_data_dir: folder {data_dir} does not exist")
    if caption_extension is not None:
        rows = _caption_file_rows(data_dir, caption_extension)
    else:
        rows = _metadata_rows(data_dir, caption_column)
    if max_train_samples is not None:
        order = np.random.default_rng(seed).permutation(len(rows))[:max_train_samples]
        rows = [rows[i] for i in order]
    return _check_clips(rows, f"folder {data_dir}", num_frames, step)


def _caption_file_rows(data_dir: Path, extension: str) -> list[tuple[str | None, str, str]]:
    """Clips with the text of ``<clip><extension>`` beside them: files of :data:`CLIP_EXTENSIONS`
    and folders that have such a caption file (frame folders; their frames are not clips)."""
    check_caption_extension(extension)
    folders = sorted(
        p for p in data_dir.rglob("*") if p.is_dir() and p.with_name(p.name + extension).is_file()
    )
    inside = tuple(folders)
    clips = [
        p
        for p in data_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in CLIP_EXTENSIONS and not any(f in p.parents for f in inside)
    ]
    clips = sorted([*clips, *folders])
    if not clips:
        coded = sorted(p.name for p in data_dir.rglob("*") if p.suffix.lower() in CODED_VIDEO_EXTENSIONS)
        hint = f" ({coded[0]} is a coded video: make it a frame folder or animated WebP)" if coded else ""
        raise ValueError(f"--train_data_dir: no clips, frame folders or images in {data_dir}{hint}")
    rows = []
    for clip in clips:
        text_file = clip.with_name(clip.name + extension) if clip.is_dir() else clip.with_suffix(extension)
        rows.append((str(clip), str(clip), read_caption_file(clip, text_file, extension)))
    return rows


def _metadata_rows(data_dir: Path, column: str) -> list[tuple[str | None, str, str | list[str]]]:
    """``metadata.jsonl``'s rows: ``file_name`` (a clip or a frame folder) and the caption column."""
    metadata = data_dir / "metadata.jsonl"
    if not metadata.is_file():
        raise ValueError(
            f"--train_data_dir: {data_dir} has no metadata.jsonl; give it one (file_name, {column}) or put a "
            "caption file beside each clip (--caption_extension .txt)"
        )
    rows = []
    for number, row in metadata_records(metadata):
        name = row.get("file_name") if isinstance(row, dict) else None
        if not isinstance(name, str) or leaves_folder(name):
            raise ValueError(
                f"--train_data_dir: {metadata} row {number}: file_name {name!r} must name a clip or frame "
                f"folder inside {data_dir}"
            )
        caption = row.get(column)
        texts = caption if isinstance(caption, list) else [caption]
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(
                f"--train_data_dir: {metadata} row {number} ({name}): no caption in --caption_column {column!r}"
            )
        path = data_dir / name
        rows.append((str(path) if path.exists() else None, str(path), caption))
    if not rows:
        raise ValueError(f"--train_data_dir: {metadata} lists no clips")
    return rows


def _check_clips(rows, origin: str, num_frames: int, step: int) -> VideoCaptions:
    sources, captions, sizes, frames, bad = [], [], [], [], []
    for source, name, caption in rows:
        size, available, error = (
            (None, 0, "no such file") if source is None else inspect_clip(source, num_frames, step)
        )
        if error:
            bad.append(f"{name}: {error}")
            continue
        sources.append(source)
        captions.append(caption)
        sizes.append(size)
        frames.append(available)
    if bad:
        logger.warning("skipped %d unreadable clip(s) of %s: %s", len(bad), origin, "; ".join(bad[:20]))
    if not sources:
        raise ValueError(f"no readable clips in {origin}" + (f" ({len(bad)} unreadable)" if bad else ""))
    return VideoCaptions(sources, captions, sizes, bad, origin, frames)


class TextVideoDataset(TextImageDataset):
    """:class:`~.data.TextImageDataset` of clips: ``pixel_values`` ``(3, F, bh, bw)``, ``F`` the
    clip's :func:`usable_frames`; batches group clips of one frame count and spatial bucket
    (``bucket_of`` numbers those pairs, ``buckets`` holds each pair's spatial size)."""

    def __init__(
        self,
        data: VideoCaptions,
        tokenizer,
        buckets: list[tuple[int, int]],
        num_frames: int,
        frame_step: int,
        random_crop: bool = False,
        random_flip: bool = False,
        caption_dropout_rate: float = 0.0,
    ):
        super().__init__(data, tokenizer, buckets, random_crop, random_flip, caption_dropout_rate)
        #: frames each clip trains on
        self.frame_counts = [usable_frames(n, num_frames, frame_step) for n in data.frames]
        spatial = [nearest_bucket(size, list(buckets)) for size in data.sizes]
        pairs = sorted(set(zip(self.frame_counts, spatial, strict=True)))
        #: ``(frames, (height, width))`` of each bucket
        self.clip_buckets = [(f, tuple(buckets[s])) for f, s in pairs]
        self.buckets = [size for _, size in self.clip_buckets]
        self.bucket_of = [pairs.index(pair) for pair in zip(self.frame_counts, spatial, strict=True)]

    def pixels(self, index: int, plan) -> torch.Tensor:
        frames = read_frames(self.data.sources[index], self.frame_counts[index])
        return torch.stack([crop_pixels(frame, plan) for frame in frames], dim=1)


def describe_clips(dataset: TextVideoDataset) -> list[str]:
    """Start-up lines: one per bucket (frames, size, clips), and the skipped clips."""
    counts = Counter(dataset.bucket_of)
    lines = [
        f"bucket {frames} frame(s) of {h}x{w} (height x width): {counts[b]} clip(s)"
        for b, (frames, (h, w)) in enumerate(dataset.clip_buckets)
    ]
    skipped = dataset.data.skipped_files
    lines.append(f"skipped {len(skipped)} clip(s)" + (": " + "; ".join(skipped[:20]) if skipped else ""))
    return lines
