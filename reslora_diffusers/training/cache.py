"""On-disk caches of VAE latents and text conditioning (``--cache_latents``,
``--cache_text_embeddings``).

An entry is one safetensors file, ``<root>/<kind>/<d[:2]>/<d>.safetensors`` where ``d`` is the
SHA-256 of its key (JSON, also stored in the file's metadata and compared when read):

* latents: the SHA-256 of the image file's bytes, a fingerprint of the VAE's weights and their
  dtype, and the crop (:class:`~.data.CropPlan`: sizes, crop position, flip). The entry holds the
  VAE posterior's parameters (``DiagonalGaussianDistribution.parameters``: mean and log-variance
  on the channel axis), not one sample of it, so that training draws a new sample every step
  as it does without the cache;
* text: the caption, its token ids for every text encoder, the encoders' fingerprints and
  dtype, and the objective; the entry holds the denoiser's text inputs (a dict of tensors).

A changed key field gives a new file; an unchanged one reuses the old. A file that does not
load, holds other tensors or shapes than expected, non-finite values or another key is
damaged: it is recomputed with a warning, never trained on. Files are written under a
temporary name and renamed, so an interrupted write leaves no entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..utils.errors import one_line
from .data import CropPlan, TextImageDataset, source_bytes

logger = logging.getLogger(__name__)

#: bumped when what an entry holds changes for the same key fields (pixel conversion, layout)
CACHE_FORMAT = 1


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model's state dict: every tensor's name, dtype, shape and bytes (a 0-d
    tensor, such as a batch norm's ``num_batches_tracked``, flattened first: only a tensor with
    an axis can be viewed as bytes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class DamagedEntry(Exception):
    """A cache file that cannot be used; the message says why."""


@dataclass
class CacheStats:
    """What one build found: entries reused, computed (new or damaged) and damaged."""

    reused: int = 0
    computed: int = 0
    damaged: int = 0


class EntryStore:
    """Safetensors files named by the digest of their key, written atomically, checked on read."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key_text(key: dict) -> str:
        return json.dumps(key, sort_keys=True)

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(self.key_text(key).encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.safetensors"

    def read(self, key: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """The entry's tensors; :class:`DamagedEntry` if it is missing parts, has other names or
        shapes than ``shapes``, non-finite values, or another key; ``FileNotFoundError`` if absent."""
        path = self.path(key)
        try:
            with safe_open(str(path), framework="pt") as f:
                stored_key = (f.metadata() or {}).get("key")
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as err:
            if not path.exists():
                raise FileNotFoundError(path) from err
            raise DamagedEntry(f"unreadable ({one_line(err)})") from err
        if stored_key != self.key_text(key):
            raise DamagedEntry("it was written for another key")
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != shapes:
            raise DamagedEntry(f"it holds {got}, expected {shapes}")
        if not all(bool(torch.isfinite(v).all()) for v in tensors.values()):
            raise DamagedEntry("it holds NaN or infinite values")
        return tensors

    def write(self, key: dict, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(plain, str(tmp), metadata={"key": self.key_text(key)})
        os.replace(tmp, path)

    def check(self, key: dict, shapes: dict[str, tuple[int, ...]], what: str, stats: CacheStats) -> bool:
        """Whether a valid entry exists (counted as reused); a damaged one is warned about."""
        try:
            self.read(key, shapes)
        except FileNotFoundError:
            return False
        except DamagedEntry as err:
            logger.warning("cache entry %s of %s is damaged (%s); recomputing it", self.path(key), what, err)
            stats.damaged += 1
            return False
        stats.reused += 1
        return True

    def load(self, key: dict, shapes: dict[str, tuple[int, ...]], what: str) -> dict[str, torch.Tensor]:
        """Read an entry that was checked at start; an error names it if it changed since."""
        try:
            return self.read(key, shapes)
        except (FileNotFoundError, DamagedEntry) as err:
            raise ValueError(
                f"cache entry {self.path(key)} of {what} is gone or damaged since the run started "
                f"({err}); rerun to recompute it"
            ) from err


class LatentCache:
    """VAE posterior parameters per (image, crop); ``load(index, plan)`` for the dataset. It holds
    no model (data-loader workers get a copy of it)."""

    def __init__(
        self, root: Path, dataset: TextImageDataset, vae: nn.Module, vae_scale: int, latent_channels: int
    ) -> None:
        self.store = EntryStore(Path(root) / "latents")
        self.vae_scale = vae_scale
        self.channels = 2 * latent_channels
        self.model_key = {"vae": fingerprint(vae), "dtype": str(vae.dtype)}
        self.names = [
            s if isinstance(s, str) else f"image {i} of {dataset.data.origin}"
            for i, s in enumerate(dataset.data.sources)
        ]
        self.images = [hashlib.sha256(source_bytes(s)).hexdigest() for s in dataset.data.sources]

    def key(self, index: int, plan: CropPlan) -> dict:
        return {
            "format": CACHE_FORMAT,
            "kind": "latents",
            "image": self.images[index],
            **self.model_key,
            "original_size": list(plan.original_size),
            "resized_size": list(plan.resized_size),
            "crop_top_left": list(plan.crop_top_left),
            "target_size": list(plan.target_size),
            "flip": plan.flip,
        }

    def shapes(self, plan: CropPlan) -> dict[str, tuple[int, ...]]:
        h, w = plan.target_size
        return {"parameters": (self.channels, h // self.vae_scale, w // self.vae_scale)}

    def load(self, index: int, plan: CropPlan) -> torch.Tensor:
        return self.store.load(self.key(index, plan), self.shapes(plan), self.names[index])["parameters"]

    def build(
        self, dataset: TextImageDataset, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int
    ) -> CacheStats:
        """Check every entry ``dataset`` can ask for; compute the missing and damaged ones in
        batches of one bucket with ``encode``: pixels (B, 3, H, W) -> parameters (B, 2 C, H/f, W/f)."""
        if dataset.random_crop:
            raise ValueError("a latent cache holds one crop per image; random crops cannot be cached")
        stats = CacheStats()
        pending: dict[tuple[int, int], list[tuple[int, CropPlan]]] = {}
        for index in range(len(dataset)):
            for plan in dataset.cached_plans(index):
                if not self.store.check(self.key(index, plan), self.shapes(plan), self.names[index], stats):
                    pending.setdefault(plan.target_size, []).append((index, plan))
        total = sum(len(v) for v in pending.values())
        with (
            tqdm(total=total, desc="caching latents", unit="image", disable=not total) as bar,
            torch.no_grad(),
        ):
            for entries in pending.values():
                for start in range(0, len(entries), batch_size):
                    chunk = entries[start : start + batch_size]
                    pixels = torch.stack([dataset.pixels(i, plan) for i, plan in chunk])
                    for (index, plan), params in zip(chunk, encode(pixels), strict=True):
                        self.store.write(self.key(index, plan), {"parameters": params})
                    bar.update(len(chunk))
        stats.computed = total
        return stats


class TextCache:
    """The denoiser's text inputs per caption; ``load(caption)`` for the dataset. It holds no
    model: the keys of the captions it serves are computed when it is built."""

    def __init__(self, root: Path, keys: dict[str, dict], entry_shapes: dict[str, tuple[int, ...]]) -> None:
        self.store = EntryStore(Path(root) / "text")
        self.keys = keys
        #: every entry's tensors and their per-caption shapes
        self.entry_shapes = entry_shapes

    @classmethod
    def build(
        cls,
        root: Path,
        captions: set[str],
        model_key: dict,
        token_ids: Callable[[list[str]], dict[str, torch.Tensor]],
        encode: Callable[[list[str]], dict[str, torch.Tensor]],
        batch_size: int,
    ) -> tuple[TextCache, CacheStats]:
        """The cache of ``captions``: keys from ``model_key`` (encoders' fingerprints, dtype,
        objective) and each caption's ``token_ids`` (``{encoder: (B, L)}``); missing or damaged
        entries computed with ``encode`` (captions -> ``{name: (B, ...)}``)."""
        ordered = sorted(captions)
        keys = {}
        for start in range(0, len(ordered), 256):
            chunk = ordered[start : start + 256]
            ids = token_ids(chunk)
            for j, caption in enumerate(chunk):
                tokens = {name: t[j].tolist() for name, t in sorted(ids.items())}
                keys[caption] = {
                    "format": CACHE_FORMAT,
                    "kind": "text",
                    "caption": caption,
                    "tokens": tokens,
                    **model_key,
                }
        with torch.no_grad():
            reference = encode([""])
        cache = cls(root, keys, {k: tuple(v.shape[1:]) for k, v in reference.items()})
        stats = CacheStats()
        pending = [c for c in ordered if not cache.store.check(keys[c], cache.entry_shapes, repr(c), stats)]
        with (
            tqdm(total=len(pending), desc="caching text", unit="caption", disable=not pending) as bar,
            torch.no_grad(),
        ):
            for start in range(0, len(pending), batch_size):
                chunk = pending[start : start + batch_size]
                encoded = encode(chunk)
                for j, caption in enumerate(chunk):
                    cache.store.write(keys[caption], {k: v[j] for k, v in encoded.items()})
                bar.update(len(chunk))
        stats.computed = len(pending)
        return cache, stats

    def load(self, caption: str) -> dict[str, torch.Tensor]:
        return self.store.load(self.keys[caption], self.entry_shapes, f"caption {caption!r}")


def default_cache_dir(output_dir: str | Path) -> Path:
    """``<parent of output_dir>/.reslora_cache``: shared by the runs of one folder, outside the
    user's data and outside a run's outputs (which ``--overwrite_output_dir`` replaces)."""
    return Path(output_dir).resolve().parent / ".reslora_cache"


def build_caches(
    dataset: TextImageDataset,
    objective,
    models: dict[str, nn.Module],
    root: Path,
    latents: bool,
    text: bool,
    batch_size: int,
) -> dict[str, CacheStats]:
    """Build (or reuse) the caches asked for with ``objective``'s public encoders and make
    ``dataset`` read them; returns the statistics per cache and logs them."""
    stats = {}
    latent_cache = text_cache = None
    if latents:
        vae = models["vae"]
        latent_cache = LatentCache(root, dataset, vae, objective.vae_scale, objective.latent_channels)
        encode = lambda pixels: objective.latent_distribution(vae, pixels)  # noqa: E731
        stats["latents"] = latent_cache.build(dataset, encode, batch_size)
    if text:
        names = objective.text_encoder_names
        model_key = {
            "objective": type(objective).__name__,
            "encoders": {name: fingerprint(models[name]) for name in names},
            "dtype": sorted({str(models[name].dtype) for name in names}),
        }
        text_cache, stats["text"] = TextCache.build(
            root,
            dataset.caption_choices(),
            model_key,
            lambda captions: {name: objective.token_ids(name, captions) for name in names},
            lambda captions: objective.encode_text(models, captions),
            batch_size,
        )
    for kind, s in stats.items():
        logger.info(
            "%s cache in %s: %d entries reused, %d computed (%d of them damaged and replaced)",
            kind,
            root,
            s.reused,
            s.computed,
            s.damaged,
        )
    dataset.use_caches(latent_cache, text_cache)
    return stats
