"""A user's own images: the two caption layouts, odd image files, aspect-ratio buckets, crops
as SDXL's time ids need them, the batch order, and the latent / text-embedding caches.

The folder is made here: portrait, landscape, square, a panorama, a tiny image, an
EXIF-rotated JPEG, RGBA, palette-with-transparency and 16-bit grayscale PNGs, a corrupt and an
empty file. The bases are tiny random pipelines (SD as the embedded base, SD3, Flux).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from reslora_diffusers.data import build_pipeline
from reslora_diffusers.training.cache import build_caches, default_cache_dir
from reslora_diffusers.training.data import (
    BucketBatchSampler,
    TextImageDataset,
    auto_buckets,
    collate,
    load_image_captions,
    parse_buckets,
)
from tests.runs import assert_same_weights, error, from_checkpoint, script
from tests.scripts import load_benchmark
from tests.tiny_dits import tiny_flux_pipeline, tiny_sd3_pipeline

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

ROOT = Path(__file__).resolve().parent.parent

#: (height, width) of each image as a viewer shows it; the JPEG is stored 24 high, 48 wide
#: with EXIF orientation 6 (rotate 90 degrees clockwise to view)
SIZES = {
    "portrait.png": (50, 30),
    "landscape.png": (30, 50),
    "square.png": (40, 40),
    "panorama.png": (20, 120),
    "tiny.png": (5, 6),
    "rotated.jpg": (48, 24),
    "rgba.png": (32, 32),
    "palette.png": (16, 16),
    "gray16.png": (24, 32),
}
BAD = {"corrupt.png": b"\x89PNG\r\n\x1a\n not really a png", "empty.png": b""}
#: four buckets of 1024 pixels, sides multiples of 4 (the tiny UNet's step at VAE factor 2)
BUCKETS = [(32, 32), (48, 24), (24, 48), (64, 16), (16, 64)]
#: the nearest bucket in log aspect ratio, worked out by hand from SIZES
NEAREST = {
    "portrait.png": (48, 24),  # 1.67: log 0.51, nearer 2 (0.69) than 1 (0)
    "landscape.png": (24, 48),
    "square.png": (32, 32),
    "panorama.png": (16, 64),  # 1/6: log -1.79, nearest 1/4 (-1.39)
    "tiny.png": (32, 32),  # 5/6
    "rotated.jpg": (48, 24),  # upright it is 2:1 tall
    "rgba.png": (32, 32),
    "palette.png": (32, 32),
    "gray16.png": (32, 32),  # 3/4: log -0.29, nearer 1 than 1/2 (-0.69)
}


def caption_of(name: str) -> str:
    return f"a photo of {Path(name).stem}"


def _noise(rng, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_mixed_folder(folder: Path, layout: str = "txt") -> Path:
    """The images of SIZES and BAD with captions in ``.txt`` files or in ``metadata.jsonl``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("portrait.png", "landscape.png", "square.png", "panorama.png", "tiny.png"):
        Image.fromarray(_noise(rng, *SIZES[name])).save(folder / name)
    stored = _noise(rng, 24, 48)
    stored[:12, :24] = (255, 0, 0)  # the stored top-left quarter is red: upright, it is top-right
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(folder / "rotated.jpg", exif=exif, quality=95)
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:, :16] = (255, 0, 0, 0)  # transparent red: should read as the white behind it
    rgba[:, 16:] = (0, 0, 255, 255)
    Image.fromarray(rgba, mode="RGBA").save(folder / "rgba.png")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    palette.paste(1, (8, 0, 16, 16))  # right half colour 1 (black); left half colour 0, transparent
    palette.save(folder / "palette.png", transparency=0)
    gray = np.full((24, 32), 65535, dtype=np.uint16)
    gray[:, 16:] = 128 * 257
    Image.fromarray(gray).save(folder / "gray16.png")
    for name, data in BAD.items():
        (folder / name).write_bytes(data)
    names = [*SIZES, *BAD]
    if layout == "txt":
        for name in names:
            (folder / name).with_suffix(".txt").write_text(caption_of(name) + "\n")
    else:
        rows = [{"file_name": name, "text": caption_of(name)} for name in names]
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return make_mixed_folder(tmp_path_factory.mktemp("mixed") / "photos")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Tiny random SD (twice, with different weights), SD3 and Flux pipeline folders."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for name, seed in (("sd", 0), ("sd-other", 1)):
        torch.manual_seed(seed)
        build_pipeline(root / f"tok-{name}").save_pretrained(root / name)
        out[name] = root / name
    for name, make in (("sd3", tiny_sd3_pipeline), ("flux", tiny_flux_pipeline)):
        make(root / f"tok-{name}").save_pretrained(root / name)
        out[name] = root / name
    return out


def _by_name(data) -> dict[str, int]:
    return {Path(s).name: i for i, s in enumerate(data.sources)}


def _objective_and_dataset(base: Path, folder: Path, *extra: str):
    argv = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(folder)]
    argv += ["--caption_extension", ".txt", "--output_dir", str(folder.parent / "out"), *extra]
    args = script.parse_args(argv)
    script.check_args(args)
    objective = script.load_models(args)
    resolution = args.resolution or objective.default_resolution()
    _, dataset = script.load_training_data(args, objective, resolution)
    return args, objective, dataset


# ----------------------------------------------------------------------------- reading


def test_images_are_read_upright_in_rgb_and_bad_files_are_skipped_by_name(mixed, caplog):
    with caplog.at_level(logging.WARNING):
        data = load_image_captions(None, mixed, "image", "text", caption_extension=".txt")
    index = _by_name(data)
    assert set(index) == set(SIZES)
    assert {name: data.sizes[i] for name, i in index.items()} == SIZES
    assert {name: data.captions[i] for name, i in index.items()} == {n: caption_of(n) for n in SIZES}
    assert sorted(Path(s.split(":")[0]).name for s in data.skipped_files) == sorted(BAD)
    assert any("empty.png: empty file (0 bytes)" in s for s in data.skipped_files)
    assert "corrupt.png" in caplog.text and "empty.png" in caplog.text

    dataset = TextImageDataset(data, None, [(64, 64)])

    def pixels(name):  # centred 64 x 64 crop, as uint8
        i = index[name]
        values = dataset.pixels(i, dataset.plan(i, flip=False))
        return ((values.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(int)

    rotated = pixels("rotated.jpg")  # 24 x 48 upright -> 64 x 128, centred: columns 32..95
    assert np.abs(rotated[4, 60] - (255, 0, 0)).max() < 40  # the red corner is now top-right
    assert np.abs(rotated[60, 4] - (255, 0, 0)).max() > 100
    rgba = pixels("rgba.png")
    assert (rgba[32, 8] == 255).all() and tuple(rgba[32, 56]) == (0, 0, 255)
    palette = pixels("palette.png")
    assert (palette[32, 8] == 255).all() and (palette[32, 56] == 0).all()
    gray = pixels("gray16.png")  # 65535 -> 255, 128 * 257 -> 128 (PIL's own conversion clips both to 255)
    assert (gray[32, 4] == 255).all() and (gray[32, 60] == 128).all()


def test_captions_from_metadata_jsonl_equal_those_from_txt_files(mixed, tmp_path):
    folder = make_mixed_folder(tmp_path / "jsonl", layout="jsonl")
    from_jsonl = load_image_captions(None, folder, "image", "text")
    from_txt = load_image_captions(None, mixed, "image", "text", caption_extension=".txt")
    assert dict(
        zip(map(lambda s: Path(s).name, from_jsonl.sources), from_jsonl.captions, strict=True)
    ) == dict(zip(map(lambda s: Path(s).name, from_txt.sources), from_txt.captions, strict=True))
    assert from_jsonl.sizes == [from_txt.sizes[_by_name(from_txt)[Path(s).name]] for s in from_jsonl.sources]


def test_missing_or_empty_captions_and_bad_metadata_are_named(mixed, tmp_path):
    folder = tmp_path / "txt"
    shutil.copytree(mixed, folder)
    (folder / "square.txt").unlink()
    with pytest.raises(
        ValueError, match=r"square.png: no caption file square.txt \(--caption_extension .txt\)"
    ):
        load_image_captions(None, folder, "image", "text", caption_extension=".txt")
    (folder / "square.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"square.txt: the caption of square.png is empty"):
        load_image_captions(None, folder, "image", "text", caption_extension=".txt")

    jsonl = make_mixed_folder(tmp_path / "jsonl", layout="jsonl")
    metadata = jsonl / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    rows[0]["text"] = ""
    metadata.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"portrait.png: no caption \(--caption_column 'text' is empty\)"):
        load_image_captions(None, jsonl, "image", "text")
    metadata.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    with pytest.raises(ValueError, match=r"portrait.png has no caption: no row of .*metadata.jsonl names it"):
        load_image_captions(None, jsonl, "image", "text")
    metadata.write_bytes(b'{"file_name": "square.png", "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl is not UTF-8 text"):
        load_image_captions(None, jsonl, "image", "text")


# ----------------------------------------------------------------------------- buckets


def test_bucket_assignment_is_the_nearest_log_aspect_ratio(mixed):
    data = load_image_captions(None, mixed, "image", "text", caption_extension=".txt")
    dataset = TextImageDataset(data, None, BUCKETS)
    for name, i in _by_name(data).items():
        h, w = data.sizes[i]
        distances = [abs(math.log(h / w) - math.log(bh / bw)) for bh, bw in BUCKETS]
        assert BUCKETS[dataset.bucket_of[i]] == BUCKETS[int(np.argmin(distances))] == NEAREST[name], name


def test_auto_buckets_and_the_bucket_string():
    buckets = auto_buckets(512, 64)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 512 * 512 and max(h / w, w / h) <= 4
        assert (w, h) in buckets
        assert (h + 64) * w > 512 * 512 or h * (w + 64) > 512 * 512  # neither side can grow
    assert parse_buckets("512,512; 448,576;512,512") == [(512, 512), (448, 576)]
    with pytest.raises(ValueError, match="--aspect_ratio_buckets: '512x512' is not 'height,width'"):
        parse_buckets("512x512")


def test_batches_hold_one_bucket_and_the_order_is_seeded_per_epoch(mixed):
    data = load_image_captions(None, mixed, "image", "text", caption_extension=".txt")
    dataset = TextImageDataset(data, None, BUCKETS, random_crop=True, random_flip=True)
    sampler = BucketBatchSampler(dataset.bucket_of, 2, seed=3)
    epochs = []
    for epoch in range(3):
        sampler.start_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i, _ in b) == list(range(len(dataset)))
        sizes = [len(b) for b in batches]  # full batches first (one shape for a compiled model)
        assert sizes == sorted(sizes, reverse=True) and sizes.count(1) < len(sizes)
        for keys in batches:
            assert len({dataset.bucket_of[i] for i, _ in keys}) == 1
            batch = collate([dataset[k] for k in keys])  # one bucket: the pixels stack
            assert batch["pixel_values"].shape[-2:] == BUCKETS[dataset.bucket_of[keys[0][0]]]
        epochs.append(batches)
    again = BucketBatchSampler(dataset.bucket_of, 2, seed=3)
    again.start_epoch(1)
    assert list(again) == epochs[1] and epochs[0] != epochs[1]
    other = BucketBatchSampler(dataset.bucket_of, 2, seed=4)
    assert list(other) != epochs[0]


def test_crop_fields_are_each_images_size_and_crop_as_sdxl_time_ids_need(mixed):
    """original_size is the upright size, target_size the bucket, crop_top_left the crop's corner
    in the resized image after the flip (diffusers' SDXL script flips, then crops)."""
    data = load_image_captions(None, mixed, "image", "text", caption_extension=".txt")
    names = {i: name for name, i in _by_name(data).items()}
    centred = TextImageDataset(data, None, BUCKETS)
    for i, name in names.items():
        item = centred[(i, 0)]
        (h, w), (bh, bw) = SIZES[name], NEAREST[name]
        s = max(bh / h, bw / w)
        rh, rw = max(bh, round(h * s)), max(bw, round(w * s))
        assert item["original_size"] == (h, w) and item["target_size"] == (bh, bw)
        assert item["crop_top_left"] == (int(round((rh - bh) / 2)), int(round((rw - bw) / 2)))

    randomly = TextImageDataset(data, None, BUCKETS, random_crop=True, random_flip=True)
    flips = set()
    for seed in range(24):
        i = list(names)[seed % len(names)]
        if names[i] == "gray16.png":  # PIL's conversion below would clip it
            continue
        item = randomly[(i, seed)]
        (h, w), (bh, bw) = SIZES[names[i]], NEAREST[names[i]]
        s = max(bh / h, bw / w)
        rh, rw = max(bh, round(h * s)), max(bw, round(w * s))
        top, left = item["crop_top_left"]
        assert 0 <= top <= rh - bh and 0 <= left <= rw - bw
        upright = ImageOps.exif_transpose(Image.open(data.sources[i])).convert("RGBA")
        white = Image.new("RGBA", upright.size, (255, 255, 255, 255))
        resized = (
            Image.alpha_composite(white, upright).convert("RGB").resize((rw, rh), Image.Resampling.BILINEAR)
        )
        got = ((item["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).round()
        matches = []
        for flip in (False, True):
            source = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else resized
            want = np.asarray(source.crop((left, top, left + bw, top + bh)), dtype=np.float64)
            if np.abs(got - want).max() <= 1:
                matches.append(flip)
        assert len(matches) == 1, names[i]
        flips.add(matches[0])
    assert flips == {False, True}

    batch = collate(
        [centred[(i, 0)] for i in (_by_name(data)["portrait.png"], _by_name(data)["rotated.jpg"])]
    )
    assert batch["original_sizes"] == [(50, 30), (48, 24)]
    assert batch["target_sizes"] == [(48, 24), (48, 24)]
    # portrait: s = max(48 / 50, 24 / 30) = 0.96 -> 48 x 29, left = round(2.5) = 2 (Python's round,
    # as diffusers' script); the upright JPEG is its bucket's size
    assert batch["crop_top_lefts"] == [(0, 2), (0, 0)]


def test_caption_dropout_share_is_within_a_binomial_interval(mixed):
    data = load_image_captions(None, mixed, "image", "text", caption_extension=".txt")
    rate, n = 0.3, 3000
    dataset = TextImageDataset(data, None, [(8, 8)], caption_dropout_rate=rate)
    sampler = BucketBatchSampler(dataset.bucket_of, 9, seed=0)
    rngs = []
    for epoch in range(math.ceil(n / len(dataset))):
        sampler.start_epoch(epoch)
        rngs += [key for batch in sampler for key in batch]
    empty = sum(dataset.caption(i, np.random.default_rng(seed)) == "" for i, seed in rngs[:n])
    # the central 99.9 % of Binomial(n, rate), from its CDF written out
    log_pmf = [
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(rate)
        + (n - k) * math.log(1 - rate)
        for k in range(n + 1)
    ]
    pmf = np.exp(log_pmf)
    cdf = np.cumsum(pmf)
    low, high = int(np.searchsorted(cdf, 0.0005)), int(np.searchsorted(cdf, 0.9995))
    assert low <= empty <= high, (low, empty, high)
    kept = [dataset.caption(i, np.random.default_rng(seed)) for i, seed in rngs[:50]]
    assert {c for c in kept if c} <= {caption_of(n) for n in SIZES}
    # the item carries that draw (no flip or crop draws come before it here)
    for index, seed in rngs[:20]:
        assert dataset[(index, seed)]["caption"] == dataset.caption(index, np.random.default_rng(seed))


# ----------------------------------------------------------------------------- objectives


@pytest.mark.parametrize(
    ("family", "message"),
    [
        ("sd", "bucket 30,32: sides must be multiples of 4 px for stable_diffusion pipelines"),
        ("flux", "bucket 30,32: sides must be multiples of 4 px for flux pipelines"),
        ("sd3", "bucket 30,32: sides must be multiples of 4 px for stable_diffusion_3 pipelines"),
    ],
)
def test_buckets_must_fit_the_family(bases, mixed, tmp_path, family, message):
    args = script.parse_args(["--pretrained_model_name_or_path", str(bases[family])])
    objective = script.load_models(args)
    with pytest.raises(ValueError, match=message):
        objective.check_buckets([(32, 32), (30, 32)])
    assert objective.side_step == 4
    assert objective.bucket_step(32) == 8 and objective.bucket_step(512) == 64
    if family == "sd3":  # pos_embed_max_size 16 patches of 2 latents of 2 px
        with pytest.raises(ValueError, match="bucket 16,128: the transformer takes sides up to 64 px"):
            objective.check_buckets([(16, 128)])


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_cached_inputs_give_the_loss_of_uncached_ones_on_non_square_latents(bases, mixed, tmp_path, family):
    """The VAE posterior and text inputs read from the caches give the uncached loss under the
    same random state (the posterior's sample is drawn at the same point, from the same
    state); a different state gives another sample of the cached posterior."""
    folder = tmp_path / "photos"
    shutil.copytree(mixed, folder)
    buckets = "16,24;24,16;20,20"  # non-square latents of every family
    args, objective, dataset = _objective_and_dataset(
        bases[family],
        folder,
        "--aspect_ratio_buckets",
        buckets,
        "--random_flip",
        "--caption_dropout_rate",
        "0.5",
    )
    models = objective.models
    sampler = BucketBatchSampler(dataset.bucket_of, 3, args.seed)
    keys = [b for b in sampler if dataset.buckets[dataset.bucket_of[b[0][0]]] != (20, 20)][0]
    plain = collate([dataset[k] for k in keys])
    build_caches(dataset, objective, models, tmp_path / "cache", latents=True, text=True, batch_size=2)
    cached = collate([dataset[k] for k in keys])
    assert "pixel_values" not in cached and "latent_parameters" in cached
    assert cached["captions"] == plain["captions"] and cached["original_sizes"] == plain["original_sizes"]
    with torch.no_grad():
        losses = []
        for batch in (plain, cached):
            torch.manual_seed(7)
            losses.append(objective.loss(models, batch, torch.float32))
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for name, value in objective.encode_text(models, plain["captions"]).items():
            torch.testing.assert_close(cached["text_conditioning"][name], value, rtol=1e-5, atol=1e-6)
        torch.manual_seed(7)
        first = objective.batch_latents(models, cached, torch.float32)
        torch.manual_seed(8)
        second = objective.batch_latents(models, cached, torch.float32)
    assert not torch.equal(first, second)  # a new sample each step, not one frozen one
    assert first.shape[-2] != first.shape[-1]


# ----------------------------------------------------------------------------- the cache


def _entries(root: Path, kind: str) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in (root / kind).rglob("*.safetensors")}


def test_cache_is_reused_rebuilt_on_a_new_vae_or_resolution_and_repairs_damage(
    bases, mixed, tmp_path, caplog
):
    folder = tmp_path / "photos"
    shutil.copytree(mixed, folder)
    root = tmp_path / "cache"

    def build(base, *extra):
        _, objective, dataset = _objective_and_dataset(base, folder, "--aspect_ratio_buckets", "auto", *extra)
        stats = build_caches(
            dataset, objective, objective.models, root, latents=True, text=True, batch_size=4
        )
        return objective, dataset, stats

    objective, dataset, first = build(bases["sd"], "--random_flip")
    images = len(SIZES)
    assert (first["latents"].computed, first["latents"].reused) == (2 * images, 0)  # both mirrors
    assert (first["text"].computed, first["text"].reused) == (images, 0)
    # an entry holds the posterior of its crop
    i = _by_name(dataset.data)["panorama.png"]
    plan = dataset.plan(i, flip=True)
    with torch.no_grad():
        want = objective.latent_distribution(objective.models["vae"], dataset.pixels(i, plan)[None])[0]
    torch.testing.assert_close(dataset.latent_cache.load(i, plan), want, rtol=1e-5, atol=1e-6)

    before = _entries(root, "latents")
    _, _, again = build(bases["sd"], "--random_flip")
    assert (again["latents"].computed, again["latents"].reused) == (0, 2 * images)
    assert again["text"].computed == 0 and _entries(root, "latents") == before

    _, _, other_vae = build(bases["sd-other"], "--random_flip")
    assert other_vae["latents"].computed == 2 * images and other_vae["text"].computed == images
    _, _, larger = build(bases["sd"], "--random_flip", "--resolution", "48")
    assert larger["latents"].computed == 2 * images and larger["text"].reused == images

    damaged = dataset.latent_cache.store.path(dataset.latent_cache.key(i, plan))
    damaged.write_bytes(damaged.read_bytes()[:-40])  # truncated
    poisoned = dataset.latent_cache.store.path(dataset.latent_cache.key(i, dataset.plan(i, flip=False)))
    tensors = load_file(str(poisoned))
    tensors["parameters"][0, 0, 0] = float("nan")
    with safe_open(str(poisoned), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(poisoned), metadata=metadata)
    with caplog.at_level(logging.WARNING):
        _, repaired_set, repaired = build(bases["sd"], "--random_flip")
    assert (repaired["latents"].damaged, repaired["latents"].computed) == (2, 2)
    assert "is damaged (unreadable" in caplog.text and "NaN or infinite" in caplog.text
    torch.testing.assert_close(repaired_set.latent_cache.load(i, plan), want, rtol=1e-5, atol=1e-6)
    assert not list(root.rglob("*.tmp"))
    # the default location: beside the output folder, outside the data and the run's outputs
    assert default_cache_dir("runs/photos") == Path("runs").resolve() / ".reslora_cache"


# ----------------------------------------------------------------------------- the script


def _script_run(base: Path, data: Path, out: Path, *extra: str) -> list[float]:
    argv = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data)]
    argv += ["--caption_extension", ".txt", "--output_dir", str(out), "--train_batch_size", "2"]
    argv += ["--report_to", "none", "--res_type", "bs", "--calibration_batches", "1", *extra]
    script.train(script.parse_args(argv), argv)
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow
def test_script_bucketed_cached_run_equals_the_uncached_one_and_resumes_exactly(
    bases, mixed, tmp_path, caplog
):
    """auto buckets, random flips, caption dropout: the cached run logs the uncached run's
    losses; resumed from its step-2 checkpoint it ends with the same weights; the bucket and
    skip lines are logged at start."""
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--aspect_ratio_buckets", "auto"]
    extra += ["--random_flip", "--caption_dropout_rate", "0.3", "--lora_dropout", "0.1"]
    caches = ["--cache_latents", "--cache_text_embeddings", "--cache_dir", str(tmp_path / "cache")]
    with caplog.at_level(logging.INFO):
        cached = _script_run(bases["sd"], mixed, tmp_path / "cached", *extra, *caches)
    buckets = auto_buckets(32, 8)  # the tiny base: 32 px, sides multiples of 8 (module doc of objectives)
    square = sum(
        min(buckets, key=lambda b: abs(math.log(h / w) - math.log(b[0] / b[1]))) == (32, 32)
        for h, w in SIZES.values()
    )
    assert f"bucket 32x32 (height x width): {square} image(s)" in caplog.text
    assert "skipped 2 image(s): " in caplog.text and "empty.png: empty file (0 bytes)" in caplog.text
    uncached = _script_run(bases["sd"], mixed, tmp_path / "uncached", *extra)
    # the same draws from the same states; the cache encodes other batches of images than the
    # steps do, which may change the round-off (here on a CPU the losses are bit-identical)
    assert len(cached) == 4 and cached == pytest.approx(uncached, rel=1e-6)

    resumed = from_checkpoint(tmp_path / "cached", 2, tmp_path / "resumed")
    tail = _script_run(bases["sd"], mixed, resumed, *extra, *caches, "--resume_from_checkpoint", "latest")
    assert tail == cached[2:]
    assert_same_weights(tmp_path / "cached", resumed)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max_train_samples", "0"], "--max_train_samples 0 must be > 0"),
        (["--max_train_samples", "-1"], "--max_train_samples -1 must be > 0"),
        (["--caption_dropout_rate", "1"], "--caption_dropout_rate 1.0 must be in [0, 1)"),
        (["--center_crop", "--random_crop"], "--center_crop and --random_crop exclude each other"),
        (["--cache_latents", "--random_crop"], "--cache_latents keeps one crop per image"),
        (["--cache_text_embeddings", "--train_text_encoder"], "--cache_text_embeddings needs frozen text"),
        (["--aspect_ratio_buckets", "32;32"], "--aspect_ratio_buckets: '32' is not 'height,width'"),
        (["--aspect_ratio_buckets", "32,30"], "bucket 32,30: sides must be multiples of 4 px"),
        (["--resolution", "40", "--caption_extension", "txt"], "--caption_extension 'txt' must be"),
        (
            ["--cache_latents", "--cache_dir", "/proc/no-cache-here"],
            "--cache_dir /proc/no-cache-here: cannot create",
        ),
    ],
)
def test_data_flags_that_cannot_work_are_refused_in_one_line(bases, mixed, tmp_path, extra, message):
    argv = ["--pretrained_model_name_or_path", str(bases["sd"]), "--train_data_dir", str(mixed)]
    if "--caption_extension" not in extra:
        argv += ["--caption_extension", ".txt"]
    got = error(bases["sd"], mixed, tmp_path / "out", *argv, *extra, defaults=False)
    assert message in got


# ----------------------------------------------------------------------------- the benchmark


def test_cache_benchmark_reads_step_times_and_builds_at_toy_size(tmp_path, capsys):
    bench = load_benchmark("bench_cache")
    log = tmp_path / "train_log.jsonl"
    times = [0.0, 1.0, 1.5, 2.5, 2.9, 3.4]  # steps 3..6 take 0.5, 1.0, 0.4, 0.5 s
    log.write_text(
        "".join(json.dumps({"step": i + 1, "loss": 0.1, "time": t}) + "\n" for i, t in enumerate(times))
    )
    assert bench.step_ms(tmp_path, 3) == pytest.approx(500.0)

    bench.main(["build", "--images", "3", "--size", "64", "--scale", "0.1"])
    out = capsys.readouterr().out
    assert "3 images at 64 px" in out and "recheck both" in out
