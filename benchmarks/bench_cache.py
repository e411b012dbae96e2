#!/usr/bin/env python
"""What ``--cache_latents`` and ``--cache_text_embeddings`` save, and what building them costs.

    python benchmarks/bench_cache.py steps [--steps 60] [--rounds 2]
    python benchmarks/bench_cache.py build [--images 100] [--size 512] [--scale 1.0]

``steps``: ``train_text_to_image.py`` on the embedded task (tiny base, the "cross" set copied to
a temporary folder so that no validation runs) with no cache, each cache alone and both, each
variant in a fresh process, the variants' order rotated every round; prints the median
milliseconds per step of steps 11..N from ``train_log.jsonl`` and the ratio to no cache.

``build``: ``--images`` generated photos (smooth random colour fields with noise, JPEG, a
temporary folder, ``.txt`` captions) and a random pipeline of SD 1.5's architecture
(``scripts/make_random_pipeline.py --preset sd15``, ``--scale`` 1 is full size); times
:func:`~reslora_diffusers.training.cache.build_caches` for the latents (square ``--size``
crops) and for the text embeddings, separately, and a rerun that only checks the entries;
wall and CPU seconds (the CPU time of this process tells the work apart from waiting on a
shared machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "train_text_to_image.py"
VARIANTS = {
    "none": [],
    "latents": ["--cache_latents"],
    "text": ["--cache_text_embeddings"],
    "both": ["--cache_latents", "--cache_text_embeddings"],
}


def step_ms(out: Path, first: int) -> float:
    """Median wall time per step of steps ``first``..N of the run in ``out`` (its training log's
    times are cumulative)."""
    from reslora_diffusers.training.run_folder import RunFolder

    times = [r["time"] for r in RunFolder(out).read_log() if "loss" in r]
    return 1000 * statistics.median(b - a for a, b in zip(times[first - 2 :], times[first - 1 :]))


def bench_steps(args: argparse.Namespace) -> None:
    from reslora_diffusers.data import default_finetune_data_dir

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "cross"
        shutil.copytree(default_finetune_data_dir(), data)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
        results: dict[str, list[float]] = {name: [] for name in VARIANTS}
        names = list(VARIANTS)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                out = Path(tmp) / f"{name}-{r}"
                cmd = [sys.executable, str(SCRIPT), "--train_data_dir", str(data), "--output_dir", str(out)]
                cmd += ["--max_train_steps", str(args.steps), "--checkpointing_steps", "100000"]
                cmd += ["--report_to", "none", "--calibration_batches", "1", "--no_chain_report"]
                cmd += ["--cache_dir", str(Path(tmp) / "cache"), *VARIANTS[name]]
                subprocess.run(cmd, env=env, check=True, capture_output=True)
                results[name].append(step_ms(out, 11))
                print(f"round {r} {name}: {results[name][-1]:.0f} ms/step", flush=True)
    base = statistics.median(results["none"])
    print("\n| caches | ms per step (median of rounds) | ratio to none |\n|---|---|---|")
    for name, values in results.items():
        ms = statistics.median(values)
        print(f"| {name} | {ms:.0f} ({', '.join(f'{v:.0f}' for v in values)}) | {ms / base:.2f} |")


def make_photos(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """``count`` JPEGs of ``size`` px: a bilinear-upsampled 8 x 8 colour field plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size))
        noisy = np.asarray(field, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(f"photo number {i} of a test set")


def bench_build(args: argparse.Namespace) -> None:
    import torch

    from reslora_diffusers.data.random_pipelines import save_random_pipeline
    from reslora_diffusers.training.cache import build_caches

    sys.path.insert(0, str(ROOT))
    import train_text_to_image as script

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = save_random_pipeline("sd15", Path(tmp) / "sd15", args.scale, torch.float32, 0)
        photos = Path(tmp) / "photos"
        make_photos(photos, args.images, args.size)
        argv = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(photos)]
        argv += [
            "--caption_extension",
            ".txt",
            "--resolution",
            str(args.size),
            "--output_dir",
            str(Path(tmp) / "o"),
        ]
        run_args = script.parse_args(argv)
        script.check_args(run_args)
        objective = script.load_models(run_args)
        _, dataset = script.load_training_data(run_args, objective, args.size)
        vae = objective.models["vae"]
        print(
            f"VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M parameters, {args.threads} thread(s)"
        )
        timings = {}
        for kind, flags in (
            ("latents", (True, False)),
            ("text", (False, True)),
            ("recheck both", (True, True)),
        ):
            start, cpu = time.perf_counter(), time.process_time()
            build_caches(
                dataset, objective, objective.models, Path(tmp) / "cache", *flags, batch_size=args.batch
            )
            timings[kind] = (time.perf_counter() - start, time.process_time() - cpu)
        print(f"\n{args.images} images at {args.size} px, batches of {args.batch}:")
        for kind, (seconds, cpu) in timings.items():
            print(
                f"  {kind}: {seconds:.1f} s wall, {cpu:.1f} s CPU ({seconds / args.images:.3f} s per image; "
                f"{seconds / args.images * 1000 / 60:.1f} min per 1,000 images at this pace)"
            )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    steps = sub.add_parser("steps", help="step time with and without the caches on the embedded task")
    steps.add_argument("--steps", type=int, default=60)
    steps.add_argument("--rounds", type=int, default=2)
    steps.add_argument("--threads", type=int, default=1)
    build = sub.add_parser("build", help="time to build the caches of generated photos, SD 1.5 sizes")
    build.add_argument("--images", type=int, default=100)
    build.add_argument("--size", type=int, default=512)
    build.add_argument("--scale", type=float, default=1.0)
    build.add_argument("--batch", type=int, default=4)
    build.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    bench_steps(args) if args.what == "steps" else bench_build(args)


if __name__ == "__main__":
    main()
