#!/usr/bin/env python
"""Compare ResLoRA shortcut types with plain LoRA on the embedded fine-tuning task.

Trains every method (PEFT LoRA as the ecosystem baseline, then ResLoRA none/is/bs/ms) with
``train_text_to_image.py`` for the same seeds and steps, and reports the loss curves and the
prompt accuracy against steps:

    python benchmarks/compare_methods.py --seeds 0 1 2 --max_train_steps 300

Writes into ``--output_dir``: one run folder per method and seed, ``compare_methods.png``
(loss and accuracy curves, mean over seeds, band = min..max), ``compare_methods.md`` (table:
mean +- std over seeds, steps to reach the baseline's final accuracy) and ``compare_methods.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    "peft-lora": ["--use_peft"],
    "none": ["--res_type", "none"],
    "is": ["--res_type", "is"],
    "bs": ["--res_type", "bs", "--pre_num", "1"],
    "ms": ["--res_type", "ms", "--pre_num", "1"],
}
BASELINE = "peft-lora"

logger = logging.getLogger("compare_methods")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max_train_steps", type=int, default=300)
    p.add_argument("--validation_steps", type=int, default=100)
    p.add_argument("--num_validation_images", type=int, default=2)
    p.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "compare_methods")
    p.add_argument("train_args", nargs="*", help="more flags for train_text_to_image.py, after --")
    return p.parse_args()


def load_train_script():
    spec = importlib.util.spec_from_file_location("train_text_to_image", ROOT / "train_text_to_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_one(script, method: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one method with one seed; return its loss curve, accuracy curve and wall time."""
    out = args.output_dir / f"{method}-seed{seed}"
    argv = [*METHODS[method], "--seed", str(seed), "--output_dir", str(out), "--report_to", "none"]
    argv += ["--max_train_steps", str(args.max_train_steps), "--validation_steps", str(args.validation_steps)]
    argv += ["--num_validation_images", str(args.num_validation_images), "--checkpointing_steps", "1000000"]
    argv += args.train_args
    start = time.time()
    summary = script.train(script.parse_args(argv), argv)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {
        "loss": [r["loss"] for r in records if "loss" in r],
        "accuracy": {r["step"]: r["prompt_accuracy"] for r in records if "prompt_accuracy" in r},
        "fidelity": (summary.get("merge_fidelity") or {}).get("unet"),
        "seconds": time.time() - start,
    }


def smooth(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """Exponential moving average along the last axis (TensorBoard's smoothing)."""
    out = np.empty_like(values)
    acc = values[..., 0]
    for i in range(values.shape[-1]):
        acc = weight * acc + (1 - weight) * values[..., i]
        out[..., i] = acc
    return out


def summarise(results: dict) -> dict:
    """Per method: mean/std of the final loss (mean of the last 10 %) and accuracy, the mean
    accuracy curve, and the first step where it reaches the baseline's final mean accuracy."""
    table = {}
    for method, runs in results.items():
        losses = np.array([r["loss"] for r in runs])
        tail = max(1, losses.shape[1] // 10)
        steps = sorted(runs[0]["accuracy"])
        acc = np.array([[r["accuracy"][s] for s in steps] for r in runs])
        table[method] = {
            "final_loss": (float(losses[:, -tail:].mean(1).mean()), float(losses[:, -tail:].mean(1).std())),
            "final_accuracy": (float(acc[:, -1].mean()), float(acc[:, -1].std())),
            "steps": steps,
            "accuracy_curve": acc.mean(0).tolist(),
            "fidelity": [r["fidelity"] for r in runs],
            "minutes": float(np.mean([r["seconds"] for r in runs]) / 60),
        }
    if BASELINE in table:
        target = table[BASELINE]["final_accuracy"][0]
        for row in table.values():
            reached = [s for s, a in zip(row["steps"], row["accuracy_curve"]) if a >= target]
            row["steps_to_baseline"] = reached[0] if reached else None
    return table


def markdown(table: dict, args: argparse.Namespace) -> str:
    head = (
        f"Seeds {args.seeds}, {args.max_train_steps} steps each, accuracy on the validation prompts x "
        f"{args.num_validation_images} images every {args.validation_steps} steps (last point: the exported "
        "LoRA loaded with `load_lora_weights`). Mean +- std over seeds.\n\n"
        "| method | final loss | final prompt accuracy | steps to reach "
        f"{BASELINE}'s final accuracy | merge error (unet) | minutes per run |\n|---|---|---|---|---|---|\n"
    )
    rows = []
    for method, row in table.items():
        fid = [f for f in row["fidelity"] if f is not None]
        fid_text = f"{max(fid):.1e} (max)" if fid else "n/a"
        reach = row.get("steps_to_baseline")
        rows.append(
            f"| {method} | {row['final_loss'][0]:.4f} +- {row['final_loss'][1]:.4f} "
            f"| {row['final_accuracy'][0]:.1%} +- {row['final_accuracy'][1]:.1%} "
            f"| {'not reached' if reach is None else reach} | {fid_text} | {row['minutes']:.1f} |"
        )
    return head + "\n".join(rows) + "\n"


def plot(results: dict, table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for method, runs in results.items():
        losses = smooth(np.array([r["loss"] for r in runs]))
        steps = np.arange(1, losses.shape[1] + 1)
        (line,) = ax_loss.plot(steps, losses.mean(0), label=method)
        ax_loss.fill_between(steps, losses.min(0), losses.max(0), color=line.get_color(), alpha=0.15)
        acc = np.array([[r["accuracy"][s] for s in table[method]["steps"]] for r in runs])
        ax_acc.plot(table[method]["steps"], acc.mean(0), marker="o", color=line.get_color(), label=method)
        ax_acc.fill_between(
            table[method]["steps"], acc.min(0), acc.max(0), color=line.get_color(), alpha=0.15
        )
    ax_loss.set(xlabel="step", ylabel="training loss (EMA 0.9)", title="loss")
    ax_acc.set(xlabel="step", ylabel="prompt accuracy", title="prompt accuracy on the concept prompts")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    script = load_train_script()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for method in args.methods:
        results[method] = [run_one(script, method, seed, args) for seed in args.seeds]
        logger.info("%s done", method)
    table = summarise(results)
    text = markdown(table, args)
    (args.output_dir / "compare_methods.md").write_text(text)
    (args.output_dir / "compare_methods.json").write_text(
        json.dumps({"table": table, "runs": results}, indent=1)
    )
    plot(results, table, args.output_dir / "compare_methods.png")
    print(text)


if __name__ == "__main__":
    main()
