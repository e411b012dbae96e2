#!/usr/bin/env python
"""Compare ResLoRA shortcut types with plain LoRA on the embedded fine-tuning task.

Trains every method (PEFT LoRA as the ecosystem baseline, then ResLoRA is/bs/ms, with the
constant and the cosine shortcut schedule) with ``train_text_to_image.py`` for the same seeds
and steps, and reports the loss curves and the prompt accuracy against steps:

    python benchmarks/compare_methods.py --seeds 0 1 2 3 4 --num_validation_images 4 --jobs 2

At ``--compare_step`` (400) and at the last step every run is measured three ways: the
trained model itself ("unmerged"), the exported LoRA loaded with ``load_lora_weights``
("exported", the calibrated merge) and, for ``is``/``ms`` with a constant schedule, the same
run exported with ``merge="distill"`` (a variant of the export, not another training run).
``compare_intervals.md`` gives per method the mean over seeds with a 95 % bootstrap
interval of each, and of the exported accuracy's paired difference to PEFT LoRA's run of
the same seed, once in each reading of the drawn shape: open-set and nearest-template (both
are kept in each ``result.json``).

Each run uses one torch thread; ``--jobs`` runs that many at once (one per core). A run whose
folder already holds ``result.json`` is not trained again, so an interrupted comparison
continues where it stopped; with ``--results_dir DIR`` each finished run's ``result.json`` (every
measurement, no weights) is also kept in ``DIR``, and a run found there counts as done, so a
comparison too long for one machine continues on the next from that folder alone;
``--report_only`` trains nothing and writes the tables of the runs finished so far (each method
over the seeds it has finished, paired with the baseline's runs of those seeds). Writes into
``--output_dir``: one run folder per method and seed, ``compare_methods.png``
(loss and accuracy curves, mean over seeds, band = min..max), ``compare_methods.md`` (table:
mean +- std over seeds, steps to reach the baseline's final accuracy) and ``compare_methods.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from reslora_diffusers.data import finetune_prompts  # noqa: E402
from reslora_diffusers.frontends import (  # noqa: E402
    DIT_ATTENTION_TARGETS,
    DIT_FEEDFORWARD_TARGETS,
    UNET_CONV_TARGETS,
    UNET_FEEDFORWARD_TARGETS,
    UNET_TARGETS,
    pipeline_family,
)
from reslora_diffusers.training.run_folder import RunFolder  # noqa: E402
from reslora_diffusers.utils.io import atomic_path  # noqa: E402

#: the default targets plus the resnet and sampler convolutions (LoCon-style)
LOCON_TARGETS = [*UNET_TARGETS, *UNET_FEEDFORWARD_TARGETS, *UNET_CONV_TARGETS]
CONSTANT = ["--shortcut_schedule", "constant"]  # shortcuts at full scale to the end
COSINE = ["--shortcut_schedule", "cosine"]  # shortcuts decaying to 0 over the second half
METHODS = {
    "peft-lora": ["--use_peft"],
    "none": ["--res_type", "none"],
    "is": ["--res_type", "is", *CONSTANT],
    "bs": ["--res_type", "bs", "--pre_num", "1", *CONSTANT],
    "ms": ["--res_type", "ms", "--pre_num", "1", *CONSTANT],
    "bs+conv": ["--res_type", "bs", "--pre_num", "1", *CONSTANT, "--target_modules", *LOCON_TARGETS],
    # the trained model is a plain LoRA at the end: an exact export
    "is-cosine": ["--res_type", "is", *COSINE],
    "bs-cosine": ["--res_type", "bs", "--pre_num", "1", *COSINE],
    "ms-cosine": ["--res_type", "ms", "--pre_num", "1", *COSINE],
    # shortcuts from the 3 previous blocks: long unbroken chains (the DiT base) can feed more
    "bs-m3": ["--res_type", "bs", "--pre_num", "3", *CONSTANT],
    "ms-m3": ["--res_type", "ms", "--pre_num", "3", *CONSTANT],
}


class Recipe(NamedTuple):
    """Fine-tuning flags for one kind of base: train_text_to_image.py flags that come after a
    method's own and before the user's (which win)."""

    denoiser: str | None  # the base's denoiser folder it is for ("unet", "transformer"); None: any
    flags: list[str]


RECIPES = {
    # the training script's defaults: attention and feed-forward projections, constant rate
    "script": Recipe(None, []),
    # the resnet and sampler convolutions too (LoCon-style) and a cosine decay of the learning
    # rate: on the candidate base (scripts/pretrain_state) PEFT LoRA's file reads 67 % open-set at
    # step 800 of 1600 (0 % with "script", whose constant rate falls apart there by step 1200)
    "locon-cosine": Recipe("unet", ["--lr_scheduler", "cosine", "--target_modules", *LOCON_TARGETS]),
    # both streams' attention and feed-forward layers and a cosine decay: on the DiT base retrained
    # on the sharper VAE PEFT LoRA's file reads 34.7 % open-set at step 2000 over 5 seeds (13 % on
    # one seed with the script's image-stream targets and constant rate; benchmarks/results/
    # dit_recipe_probes, compare_methods_dit_v2)
    "dit-ff-cosine": Recipe(
        "transformer",
        ["--lr_scheduler", "cosine", "--target_modules", *DIT_ATTENTION_TARGETS, *DIT_FEEDFORWARD_TARGETS],
    ),
}
DEFAULT_METHODS = ["peft-lora", "bs", "is", "ms", "bs-cosine", "is-cosine", "ms-cosine"]
#: runs also exported with merge="distill" (the other merges of bs and of a decayed schedule are exact)
DISTILLED = ("is", "ms")
BASELINE = "peft-lora"

logger = logging.getLogger("compare_methods")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max_train_steps", type=int, default=800)
    p.add_argument("--validation_steps", type=int, default=200)
    p.add_argument(
        "--compare_step",
        type=int,
        default=400,
        help="the early step measured exported and unmerged, besides the last (a multiple of --validation_steps)",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one torch thread each")
    p.add_argument("--num_validation_images", type=int, default=2)
    p.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "compare_methods")
    p.add_argument(
        "--results_dir",
        type=Path,
        default=None,
        help="keep each finished run's result.json here too (METHOD-seedK/result.json, small enough "
        "to commit), and take a run found here as done: a comparison continues on another machine",
    )
    p.add_argument(
        "--base",
        default="unet",
        help="unet: the embedded UNet base; dit: the embedded DiT base (assets/tiny-sd3); or a pipeline folder",
    )
    p.add_argument(
        "--recipe",
        choices=list(RECIPES),
        default="script",
        help="script: the training script's defaults; locon-cosine (UNet bases): + the UNet's "
        "convolutions and a cosine learning-rate decay; dit-ff-cosine (DiT bases): both streams' "
        "attention and feed-forward layers and a cosine learning-rate decay",
    )
    p.add_argument(
        "--report_only",
        action="store_true",
        help="train nothing: write the tables and plot of the runs already finished (at least 2 seeds "
        "per method), each method over its finished seeds",
    )
    p.add_argument("train_args", nargs="*", help="more flags for train_text_to_image.py, after --")
    args = p.parse_args(argv)
    wanted, found = RECIPES[args.recipe].denoiser, base_denoiser(args.base)
    if wanted not in (None, found):
        p.error(f"--recipe {args.recipe} is for a base with a {wanted}; --base {args.base} has a {found}")
    if not 0 < args.compare_step < args.max_train_steps or args.compare_step % args.validation_steps:
        p.error(
            f"--compare_step {args.compare_step} must be below --max_train_steps and a multiple of "
            f"--validation_steps {args.validation_steps}"
        )
    return args


def load_train_script():
    spec = importlib.util.spec_from_file_location("train_text_to_image", ROOT / "train_text_to_image.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one method with one seed (one torch thread); return its loss curve, accuracy
    curve, merge error, the accuracy of the unmerged ResLoRA model and the wall time, also
    kept as ``result.json`` in its run folder."""
    import torch

    torch.set_num_threads(1)
    out = args.output_dir / run_name(method, seed)
    script = load_train_script()
    argv = train_argv(method, seed, args)
    kept = args.results_dir / out.name / "result.json" if args.results_dir else None
    if kept is not None and kept.is_file() and not (out / "result.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "result.json", kept.read_text())
    if (out / "result.json").is_file():
        result = _read_result(out / "result.json")
    else:
        start = time.time()
        summary = script.train(script.parse_args(argv), argv)
        records = RunFolder(out).read_log()
        result = {
            "loss": [r["loss"] for r in records if "loss" in r],
            "accuracy": {r["step"]: r["prompt_accuracy"] for r in records if "prompt_accuracy" in r},
            "accuracy_lenient": {
                r["step"]: r["prompt_accuracy_lenient"] for r in records if "prompt_accuracy_lenient" in r
            },
            "merge_error": (summary.get("merge_error") or {}).get(denoiser_of(summary)),
            "seconds": time.time() - start,
        }
        write_atomic(out / "result.json", json.dumps(result))
    if "unmerged_accuracy" not in result:
        unmerged = {} if method == BASELINE else unmerged_accuracy(script, argv)
        result["unmerged_accuracy"] = unmerged.get("prompt_accuracy")
        result["unmerged_accuracy_lenient"] = unmerged.get("prompt_accuracy_lenient")
        write_atomic(out / "result.json", json.dumps(result))
    measure_run(script, method, argv, result, args, out)
    if kept is not None:  # every measurement is in: the file alone resumes the run
        write_atomic(kept, json.dumps(result))
    return result


def train_argv(method: str, seed: int, args: argparse.Namespace) -> list[str]:
    """The training script's flags for one run: the method's, the comparison's, the base's, the
    recipe's, then the user's own (argparse keeps the last of a repeated flag)."""
    out = args.output_dir / run_name(method, seed)
    argv = [*METHODS[method], "--seed", str(seed), "--output_dir", str(out), "--report_to", "none"]
    argv += ["--max_train_steps", str(args.max_train_steps), "--validation_steps", str(args.validation_steps)]
    argv += ["--num_validation_images", str(args.num_validation_images)]
    # the checkpoint at --compare_step is what is exported there
    argv += ["--checkpointing_steps", str(args.compare_step)]
    argv += ["--overwrite_output_dir"]  # a run folder without result.json is an interrupted run: redo it
    return argv + base_args(args.base) + RECIPES[args.recipe].flags + args.train_args


def measure_run(
    script, method: str, argv: list[str], result: dict, args: argparse.Namespace, out: Path
) -> None:
    """Fill ``result["measurements"][step][what]`` (``unmerged``, ``calibrated``, ``distill``:
    accuracy and lenient accuracy, merge error) at ``--compare_step`` and the last step, saving
    ``result.json`` after each so that an interrupted comparison resumes."""
    last, early = args.max_train_steps, args.compare_step
    measurements = result.setdefault("measurements", {})

    def logged(step: int) -> dict:
        if step == last:  # read only when missing: a finished result.json resumes on its own
            final = RunFolder(out).final_record()
            return {k: final[k] for k in ("prompt_accuracy", "prompt_accuracy_lenient")}
        return {
            "prompt_accuracy": result["accuracy"][step],
            "prompt_accuracy_lenient": result["accuracy_lenient"][step],
        }

    for step, kinds in wanted_measurements(method, args).items():
        done = measurements.setdefault(step, {})
        for kind in kinds:
            if kind in done:
                continue
            if method == BASELINE:  # the trained PEFT LoRA is the shipped file
                done[kind] = logged(int(step))
            elif kind == "unmerged" and int(step) == early:  # validated while training
                done[kind] = logged(early)
            elif kind == "unmerged":
                done[kind] = {
                    "prompt_accuracy": result["unmerged_accuracy"],
                    "prompt_accuracy_lenient": result.get("unmerged_accuracy_lenient"),
                }
            elif kind == "calibrated" and int(step) == last:  # the script's own export
                done[kind] = {**logged(last), "merge_error": result["merge_error"]}
            else:
                ckpt = out / (f"checkpoint-{early}" if int(step) == early else "") / RunFolder.CHECKPOINT
                done[kind] = export_accuracy(script, argv, ckpt, kind, int(step))
            write_atomic(out / "result.json", json.dumps(result))


def wanted_measurements(method: str, args: argparse.Namespace) -> dict[str, list[str]]:
    """Per measured step (``--compare_step`` and the last, as JSON keys), the kinds a finished
    run of ``method`` holds: unmerged and calibrated, and distill for :data:`DISTILLED`."""
    kinds = ["unmerged", "calibrated"] + (["distill"] if method in DISTILLED else [])
    return {str(args.compare_step): kinds, str(args.max_train_steps): list(kinds)}


def finished_runs(args: argparse.Namespace) -> dict[str, dict[int, dict]]:
    """``{method: {seed: result}}`` of the runs of ``--methods`` x ``--seeds`` whose
    ``result.json`` (in the run folder, else in ``--results_dir``) holds every wanted
    measurement; a method with fewer than 2 such seeds is left out (no interval from one seed)."""
    results = {}
    for method in args.methods:
        runs = {}
        for seed in args.seeds:
            name = run_name(method, seed)
            paths = [args.output_dir / name / "result.json"]
            paths += [args.results_dir / name / "result.json"] if args.results_dir else []
            path = next((p for p in paths if p.is_file()), None)
            result = _read_result(path) if path else None
            if result and all(
                kind in result.get("measurements", {}).get(step, {})
                for step, kinds in wanted_measurements(method, args).items()
                for kind in kinds
            ):
                runs[seed] = result
        if len(runs) >= 2:
            results[method] = runs
        else:
            logger.info("%s left out of the report: %d finished seed(s)", method, len(runs))
    return results


class TrainedDenoiser(NamedTuple):
    args: argparse.Namespace
    name: str
    model: object
    resolution: int
    calibration: list
    held_out: list


def trained_denoiser(script, argv: list[str], checkpoint: Path, held_out_batches: int = 1) -> TrainedDenoiser:
    """The run's denoiser with a saved ResLoRA checkpoint loaded (eval mode), its training
    resolution, and the batches the training script's export uses: calibration and held-out
    batches drawn from the training data through the family's objective."""
    from reslora_diffusers import load_reslora_checkpoint
    from reslora_diffusers.training.pipeline import real_inputs

    args = script.parse_args(argv)
    script.check_args(args)
    objective = script.load_models(args)
    models, name = objective.models, objective.denoiser
    load_reslora_checkpoint({name: models[name]}, checkpoint)
    for model in models.values():
        model.eval()
    resolution = args.resolution or objective.default_resolution()
    _, dataset = script.load_training_data(args, objective, resolution)
    size = args.train_batch_size
    calibration = real_inputs(objective, models, dataset, size, args.seed + 1, args.calibration_batches)
    held_out = real_inputs(objective, models, dataset, size, args.seed + 2, held_out_batches)
    return TrainedDenoiser(args, name, models[name], resolution, calibration[name], held_out[name])


def export_accuracy(script, argv: list[str], checkpoint: Path, merge: str, step: int) -> dict:
    """Export a saved ResLoRA checkpoint as the training script does (:func:`trained_denoiser`),
    load the file with ``load_lora_weights`` and score it."""
    import tempfile

    import torch

    from reslora_diffusers.export import export_lora

    run = trained_denoiser(script, argv, checkpoint)
    args, name, resolution = run.args, run.name, run.resolution
    with tempfile.TemporaryDirectory() as tmp:
        report = export_lora(
            tmp,
            **{name: run.model},
            merge=merge,
            calibration={name: run.calibration},
            eval_inputs={name: run.held_out},
            formats=["diffusers"],
            chain_report=False,
            distill_steps=args.distill_steps,
        )
        pipe = script.build_pipeline(args, torch.float32)
        pipe.load_lora_weights(tmp)
    record = script.run_validation(args, pipe, step, f"step-{step:06d}-{merge}", resolution)
    return {
        "prompt_accuracy": record["prompt_accuracy"],
        "prompt_accuracy_lenient": record["prompt_accuracy_lenient"],
        "merge_error": report["components"][name]["output_error"],
    }


def unmerged_accuracy(script, argv: list[str]) -> dict[str, float]:
    """Prompt accuracy (``prompt_accuracy``, open-set, and ``prompt_accuracy_lenient``, the
    nearest-template reading) of the trained ResLoRA model itself (shortcuts in place, loaded
    from its checkpoint), on the prompts and seeds of the final evaluation of the merged export:
    the difference is what the merge costs."""
    import torch

    from reslora_diffusers import load_reslora_checkpoint

    args = script.parse_args(argv)
    script.check_args(args)
    pipe = script.build_pipeline(args, torch.float32)
    denoiser = getattr(pipe, pipeline_family(pipe).denoiser)
    load_reslora_checkpoint(
        {pipeline_family(pipe).denoiser: denoiser}, Path(args.output_dir) / RunFolder.CHECKPOINT
    )
    denoiser.eval()
    resolution = denoiser.config.sample_size * pipe.vae_scale_factor
    record = script.run_validation(args, pipe, args.max_train_steps, "final-unmerged", resolution)
    return {k: record[k] for k in ("prompt_accuracy", "prompt_accuracy_lenient")}


def base_args(base: str) -> list[str]:
    """``--pretrained_model_name_or_path`` for ``--base``: none for ``unet`` (the training script's
    default), the embedded DiT base for ``dit``, else the folder given."""
    from reslora_diffusers.data import default_dit_base_path

    if base == "unet":
        return []
    return ["--pretrained_model_name_or_path", str(default_dit_base_path() if base == "dit" else base)]


def base_denoiser(base: str) -> str | None:
    """The denoiser of ``--base``: ``unet`` or ``transformer`` (the embedded bases, or a folder's
    denoiser subfolder); None for a folder with neither."""
    named = {"unet": "unet", "dit": "transformer"}
    if base in named:
        return named[base]
    return next((name for name in ("unet", "transformer") if (Path(base) / name).is_dir()), None)


def denoiser_of(summary: dict) -> str | None:
    """The denoiser among the components of a run's merge errors (``unet`` or ``transformer``)."""
    return next((k for k in summary.get("merge_error") or {} if k in ("unet", "transformer")), None)


def run_name(method: str, seed: int) -> str:
    """The run folder of ``method`` with ``seed``, under ``--output_dir`` and ``--results_dir``."""
    return f"{method}-seed{seed}"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` under a temporary name first: an interrupted comparison never
    leaves a half-written result or table."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _read_result(path: Path) -> dict:
    result = json.loads(path.read_text())
    for key in ("accuracy", "accuracy_lenient"):  # JSON keys are str
        result[key] = {int(step): acc for step, acc in result.get(key, {}).items()}
    return result


def bootstrap_interval(
    values, level: float = 0.95, resamples: int = 10000, seed: int = 0, statistic=np.mean
) -> tuple[float, float, float]:
    """``(statistic, low, high)``: ``statistic(values)`` (the mean unless given, e.g. ``np.median``)
    and its percentile bootstrap interval.

    ``resamples`` times, draw ``n`` values with replacement and take their statistic; the
    interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those statistics.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("bootstrap_interval needs a non-empty list of numbers")
    rng = np.random.default_rng(seed)
    stats = statistic(values[rng.integers(0, values.size, size=(resamples, values.size))], axis=1)
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(statistic(values)), float(low), float(high)


#: the two readings of a drawing's shape, as the measurements name them
READINGS = {"open-set": "prompt_accuracy", "nearest-template": "prompt_accuracy_lenient"}


def paired_seeds(runs: dict[int, dict], baseline: dict[int, dict]) -> list[int]:
    """The seeds of ``runs`` that ``baseline`` has too, in order: the ones a paired difference uses."""
    return sorted(set(runs) & set(baseline))


def paired_differences(
    runs: dict[int, dict], baseline: dict[int, dict], step: str, kind: str, reading: str = "prompt_accuracy"
) -> list[float]:
    """Per seed both have (``{seed: result}``), ``accuracy(run) - accuracy(baseline run of the
    same seed)`` of one measurement in one reading (a value of :data:`READINGS`); the
    baseline's measurement is its exported (its only) one."""
    base_kind = "calibrated"
    return [
        runs[s]["measurements"][step][kind][reading] - baseline[s]["measurements"][step][base_kind][reading]
        for s in paired_seeds(runs, baseline)
    ]


def interval_table(results: dict, steps: list[int], reading: str = "prompt_accuracy") -> dict:
    """Rows ``method`` (calibrated export) and ``method+distill`` of ``{method: {seed: result}}``;
    ``seeds`` and per step the mean and 95 % bootstrap interval over seeds of the exported
    accuracy, the unmerged accuracy and the exported accuracy's paired difference to the
    baseline's run of the same seed, in one reading (a value of :data:`READINGS`; a run measured
    before the unmerged model kept both has no cell there)."""
    table = {}
    for method, by_seed in results.items():
        runs = list(by_seed.values())
        kinds = ["calibrated"] + (["distill"] if "distill" in runs[0]["measurements"][str(steps[-1])] else [])
        for kind in kinds:
            row = table[method if kind == "calibrated" else f"{method}+distill"] = {"seeds": sorted(by_seed)}
            for step in map(str, steps):
                unmerged = [r["measurements"][step]["unmerged"].get(reading) for r in runs]
                cells = {
                    "exported": bootstrap_interval([r["measurements"][step][kind][reading] for r in runs]),
                    "unmerged": None if None in unmerged else bootstrap_interval(unmerged),
                }
                if BASELINE in results:
                    cells["vs_baseline"] = bootstrap_interval(
                        paired_differences(by_seed, results[BASELINE], step, kind, reading)
                    )
                row[step] = cells
    return table


def interval_markdown(table: dict, steps: list[int], images: int, reading: str = "open-set") -> str:
    head = (
        f"{reading.capitalize()} reading. {images} images per accuracy (prompts x generation seeds); "
        "mean over the row's seeds "
        f"[95 % bootstrap interval]. Exported: the LoRA file loaded with `load_lora_weights`; unmerged: "
        f"the trained model itself; difference: exported minus {BASELINE}'s run of the same seed.\n\n"
    )
    cols = [f"{what} @ {step}" for step in steps for what in ("exported", "unmerged", f"- {BASELINE}")]
    lines = ["| method | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, row in table.items():
        cells = [", ".join(map(str, row["seeds"]))]
        for step in map(str, steps):
            for key, sign in (("exported", ""), ("unmerged", ""), ("vs_baseline", "+")):
                value = row[step].get(key)
                cells.append("n/a" if value is None else _interval(value, sign))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _interval(value: tuple[float, float, float], sign: str = "") -> str:
    mean, low, high = (100 * v for v in value)
    return f"{mean:{sign}.1f} [{low:{sign}.1f}, {high:{sign}.1f}]"


def smooth(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """Exponential moving average along the last axis (TensorBoard's smoothing)."""
    out = np.empty_like(values)
    acc = values[..., 0]
    for i in range(values.shape[-1]):
        acc = weight * acc + (1 - weight) * values[..., i]
        out[..., i] = acc
    return out


def _mean_std(values) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def summarise(results: dict) -> dict:
    """Per method: mean/std over seeds of the final loss (mean of the last 10 % of steps), of
    its difference to the baseline's run with the same seed (the seeds share data order and
    noise, so the paired difference is far less noisy), of the unmerged and exported accuracy;
    the mean accuracy curve and the first step where it reaches the baseline's final mean."""
    table = {}
    for method, by_seed in results.items():
        runs = list(by_seed.values())
        losses = np.array([r["loss"] for r in runs])
        tail = max(1, losses.shape[1] // 10)
        steps = sorted(runs[0]["accuracy"])
        acc = np.array([[r["accuracy"][s] for s in steps] for r in runs])
        unmerged = [r.get("unmerged_accuracy") for r in runs]
        table[method] = {
            "seeds": sorted(by_seed),
            "final_loss": _mean_std(losses[:, -tail:].mean(1)),
            "final_accuracy": _mean_std(acc[:, -1]),
            "unmerged_accuracy": None if None in unmerged else _mean_std(unmerged),
            "steps": steps,
            "accuracy_curve": acc.mean(0).tolist(),
            "merge_error": [r["merge_error"] for r in runs],
            "minutes": float(np.mean([r["seconds"] for r in runs]) / 60),
        }
    if BASELINE in table:
        target = table[BASELINE]["final_accuracy"][0]
        for method, row in table.items():
            diff = paired_loss_differences(results[method], results[BASELINE])
            row["loss_vs_baseline"] = _mean_std(diff[:, -max(1, diff.shape[1] // 10) :].mean(1))
            reached = [s for s, a in zip(row["steps"], row["accuracy_curve"]) if a >= target]
            row["steps_to_baseline"] = reached[0] if reached else None
    return table


def paired_loss_differences(runs: dict[int, dict], baseline: dict[int, dict]) -> np.ndarray:
    """``loss(run) - loss(baseline run of the same seed)`` per step, one row per paired seed."""
    seeds = paired_seeds(runs, baseline)
    return np.array([runs[s]["loss"] for s in seeds]) - np.array([baseline[s]["loss"] for s in seeds])


def markdown(table: dict, args: argparse.Namespace) -> str:
    head = (
        f"{args.max_train_steps} steps each, prompt accuracy on the validation prompts x "
        f"{args.num_validation_images} images every {args.validation_steps} steps; the last point is the "
        "exported LoRA loaded with `load_lora_weights`, the column before it the trained ResLoRA model "
        "itself (shortcuts in place) on the same prompts and seeds. Mean +- std over seeds; the loss "
        f"difference is paired with {BASELINE}'s run of the same seed.\n\n"
        f"| method | seeds | final loss | loss - {BASELINE} | accuracy before merge | final accuracy (exported) "
        f"| steps to reach {BASELINE}'s final accuracy | merge error (denoiser) | minutes per run |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for method, row in table.items():
        fid = [f for f in row["merge_error"] if f is not None]
        reach = row.get("steps_to_baseline")
        cells = [
            method,
            ", ".join(map(str, row["seeds"])),
            _pm(row["final_loss"], "{:.4f}"),
            _pm(row.get("loss_vs_baseline"), "{:+.5f}"),
            _pm(row["unmerged_accuracy"], "{:.1%}"),
            _pm(row["final_accuracy"], "{:.1%}"),
            "not reached" if reach is None else str(reach),
            f"{max(fid):.1e} (max)" if fid else "n/a",
            f"{row['minutes']:.1f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def _pm(pair: tuple[float, float] | None, fmt: str) -> str:
    return "n/a" if pair is None else f"{fmt.format(pair[0])} +- {fmt.format(pair[1]).lstrip('+')}"


def _band(ax, x, curves: np.ndarray, **kwargs):
    """Mean line and min..max band over seeds."""
    (line,) = ax.plot(x, curves.mean(0), **kwargs)
    ax.fill_between(x, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15)
    return line


def plot(results: dict, table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_diff, ax_acc, ax_near) = plt.subplots(1, 4, figsize=(21, 4))
    for method, by_seed in results.items():
        runs = list(by_seed.values())
        losses = np.array([r["loss"] for r in runs])
        steps = np.arange(1, losses.shape[1] + 1)
        line = _band(ax_loss, steps, smooth(losses), label=method)
        color = line.get_color()
        if BASELINE in results:
            diff = paired_loss_differences(by_seed, results[BASELINE])
            _band(ax_diff, steps, smooth(diff), color=color, label=method)
        measured = table[method]["steps"]
        for ax, key in ((ax_acc, "accuracy"), (ax_near, "accuracy_lenient")):
            if all(s in r.get(key, {}) for r in runs for s in measured):  # older runs kept one reading
                acc = np.array([[r[key][s] for s in measured] for r in runs])
                _band(ax, measured, acc, marker="o", color=color, label=method)
    ax_loss.set(xlabel="step", ylabel="training loss (EMA 0.9)", title="loss")
    ax_diff.set(xlabel="step", ylabel="loss difference (EMA 0.9)", title=f"loss - {BASELINE}'s (same seed)")
    ax_acc.set(xlabel="step", ylabel="prompt accuracy", title="prompt accuracy, open-set reading")
    ax_near.set(xlabel="step", ylabel="prompt accuracy", title="prompt accuracy, nearest-template reading")
    ax_acc.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip("."))


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results = finished_runs(args) if args.report_only else train_all(args)
    if not results:
        raise SystemExit(f"no method has 2 finished seeds in {args.output_dir} or {args.results_dir}")
    report(results, args)


def train_all(args: argparse.Namespace) -> dict[str, dict[int, dict]]:
    """Every method x seed (``--jobs`` at once); ``{method: {seed: result}}``."""
    runs = [(method, seed) for method in args.methods for seed in args.seeds]
    # spawn: each run starts from a fresh interpreter, as a user's single run would
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {run: pool.submit(run_one, *run, args) for run in runs}
        for (method, seed), future in futures.items():
            future.result()
            logger.info("%s seed %d done", method, seed)
    return {m: {s: futures[(m, s)].result() for s in args.seeds} for m in args.methods}


def report(results: dict[str, dict[int, dict]], args: argparse.Namespace) -> None:
    """Write ``compare_methods.md``, ``compare_intervals.md`` (both readings), the JSON and the plot."""
    table = summarise(results)
    text = markdown(table, args)
    write_atomic(args.output_dir / "compare_methods.md", text)
    steps = [args.compare_step, args.max_train_steps]
    intervals = {name: interval_table(results, steps, key) for name, key in READINGS.items()}
    images = len(finetune_prompts()) * args.num_validation_images
    tables = "\n".join(interval_markdown(table, steps, images, name) for name, table in intervals.items())
    text += "\n" + tables
    write_atomic(args.output_dir / "compare_intervals.md", tables)
    write_atomic(
        args.output_dir / "compare_methods.json",
        json.dumps({"table": table, "intervals": intervals, "runs": results}, indent=1),
    )
    plot(results, table, args.output_dir / "compare_methods.png")
    print(text)


if __name__ == "__main__":
    main()
