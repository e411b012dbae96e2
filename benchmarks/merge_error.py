#!/usr/bin/env python
"""How well trained ResLoRA chains merge, per base family, shortcut type and merge method.

Trains each (base, method, seed) with ``train_text_to_image.py`` on the embedded fine-tuning
set (one torch thread, the script's defaults for that base), then merges the trained model
with every merge method and measures on held-out real batches (the training script's own
``real_inputs``: latents of training images at random timesteps):

* ``output error``: ``||y_merged - y_reslora|| / ||y_reslora||``, the merge report's figure;
* ``delta error``: ``||y_merged - y_reslora|| / ||y_reslora - y_base||``, the same error as a
  share of what the adapters changed, comparable between families whose outputs differ in scale.

    python benchmarks/merge_error.py --bases unet dit --methods is ms ms-m3 --seeds 0 1 2 \\
        --max_train_steps 400 --jobs 2

``--bases``: ``unet`` (the embedded UNet base), ``dit`` (the embedded DiT base), or
``NAME=FOLDER`` for any pipeline folder (a random one from ``scripts/make_random_pipeline.py``,
say). Runs are cached (``result.json`` per run folder), so an interrupted study continues.
Writes ``merge_error.md`` and ``merge_error.json`` into ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from compare_methods import METHODS, base_args, load_train_script, trained_denoiser  # noqa: E402

MERGES = ("input", "weight", "calibrated", "sequential")
#: the types whose merge is approximate (bs and none merge exactly)
APPROXIMATE = ("is", "ms", "ms-m3")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", nargs="+", default=["unet", "dit"])
    p.add_argument(
        "--methods", nargs="+", default=list(APPROXIMATE), choices=[m for m in METHODS if m != "peft-lora"]
    )
    p.add_argument("--merges", nargs="+", default=list(MERGES), choices=MERGES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max_train_steps", type=int, default=400)
    p.add_argument("--held_out_batches", type=int, default=2)
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one torch thread each")
    p.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "merge_error")
    p.add_argument("train_args", nargs="*", help="more flags for train_text_to_image.py, after --")
    return p.parse_args(argv)


def base_name_and_args(base: str) -> tuple[str, list[str]]:
    name, _, folder = base.partition("=")
    return name, base_args(folder or name)


def delta_error(model, merged, held_out: list[dict]) -> tuple[float, float]:
    """(output error, delta error) of ``merged`` on ``held_out`` (see the module doc)."""
    import torch

    from reslora_diffusers.merge.error import merged_view, output_tensor, reference_outputs, run_batch

    reference = reference_outputs(model, held_out)
    zero = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in merged.items()}
    num = den_out = den_delta = 0.0
    model.eval()
    with torch.no_grad():
        for batch, ref in zip(held_out, reference, strict=True):
            with merged_view(model, merged):
                got = output_tensor(run_batch(model, batch)).double()
            with merged_view(model, zero):
                base = output_tensor(run_batch(model, batch)).double()
            num += float((got - ref).square().sum())
            den_out += float(ref.square().sum())
            den_delta += float((ref - base).square().sum())
    return (num / den_out) ** 0.5, (num / den_delta) ** 0.5


def run_one(base: str, method: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one run (cached) and measure every merge of its final checkpoint."""
    import torch

    from reslora_diffusers import merge_to_lora

    torch.set_num_threads(1)
    name, extra = base_name_and_args(base)
    out = args.output_dir / f"{name}-{method}-seed{seed}"
    if (out / "result.json").is_file():
        result = json.loads((out / "result.json").read_text())
        if set(args.merges) <= set(result["merges"]):
            return result
    script = load_train_script()
    argv = [*METHODS[method], "--seed", str(seed), "--output_dir", str(out), "--report_to", "none"]
    argv += [
        "--max_train_steps",
        str(args.max_train_steps),
        "--checkpointing_steps",
        str(args.max_train_steps),
    ]
    argv += ["--validation_steps", str(args.max_train_steps), "--num_validation_images", "1"]
    argv += ["--overwrite_output_dir", *extra, *args.train_args]
    argv += ["--record_norms"] if "input" in args.merges else []  # the input merge reads them
    if not (out / script.RESLORA_CHECKPOINT).is_file():
        script.train(script.parse_args(argv), argv)

    run = trained_denoiser(script, argv, out / script.RESLORA_CHECKPOINT, args.held_out_batches)
    result = {"base": name, "method": method, "seed": seed, "merges": {}}
    for merge in args.merges:
        merged = merge_to_lora(run.model, merge=merge, calibration=run.calibration)
        out_err, delta_err = delta_error(run.model, merged, run.held_out)
        result["merges"][merge] = {"output_error": out_err, "delta_error": delta_err}
    (out / "result.json").write_text(json.dumps(result))
    return result


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    """Mean +- std over seeds of both errors, one row per (base, method), one column per merge."""
    head = "| base | method | " + " | ".join(f"{m}: output / delta error" for m in args.merges) + " |"
    lines = [head, "|---|---|" + "---|" * len(args.merges)]
    for base in args.bases:
        name = base.partition("=")[0]
        for method in args.methods:
            runs = [r for r in results if r["base"] == name and r["method"] == method]
            cells = []
            for merge in args.merges:
                pair = []
                for kind in ("output_error", "delta_error"):
                    values = [r["merges"][merge][kind] for r in runs]
                    spread = statistics.stdev(values) if len(values) > 1 else 0.0
                    pair.append(f"{statistics.mean(values):.3f} +- {spread:.3f}")
                cells.append(" / ".join(pair))
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(b, m, s) for b in args.bases for m in args.methods for s in args.seeds]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_one, *zip(*jobs), [args] * len(jobs)))
    text = markdown(results, args)
    command = "python benchmarks/merge_error.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.output_dir / "merge_error.md").write_text(f"{command}\n\n{text}\n")
    (args.output_dir / "merge_error.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
