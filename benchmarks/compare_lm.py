#!/usr/bin/env python
"""Compare LoRA and ResLoRA on the language-model examples, over seeds, with intervals.

    python benchmarks/compare_lm.py --seeds 0 1 2 3 4 --jobs 2

Runs ``examples/nlu_classification.py`` (``nlu``: tiny RoBERTa, sentiment accuracy) and
``examples/nlg_causal_lm.py`` (``nlg``: tiny LLaMA, arithmetic exact match) once per method and
seed with the examples' defaults; the seed sets the generated data, the initialisation and the
data order alike for every method, so runs of one seed are paired. Each run scores the trained
model and every PEFT adapter it exports (``--merge``; ``is``/``ms`` also with ``distill``),
loaded back with ``PeftModel.from_pretrained``. ``lora`` is ``res_type none``: LoRA's own
maths and initialisation, exported as a PEFT adapter like the others.

``compare_lm.md`` gives per example and method the mean over seeds with a 95 % bootstrap
interval of the trained metric, of the exported one, and of the exported metric's paired
difference to ``lora``'s run of the same seed. A run folder that holds ``result.json`` is not
run again, so an interrupted comparison continues where it stopped. More flags for the
examples go after ``--`` (e.g. ``-- --max_train_steps 600``).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import bootstrap_interval  # noqa: E402

from reslora_diffusers.utils.io import atomic_path  # noqa: E402


class Example(NamedTuple):
    script: str
    metric: str


EXAMPLES = {
    "nlu": Example("nlu_classification", "accuracy"),
    "nlg": Example("nlg_causal_lm", "exact_match"),
}
_DISTILL = ["--merge", "calibrated", "distill"]
METHODS = {
    "lora": ["--res_type", "none"],
    "bs": ["--res_type", "bs"],
    "is": ["--res_type", "is", *_DISTILL],
    "ms": ["--res_type", "ms", *_DISTILL],
    # shortcuts decaying to 0 over the second half: the trained model is a plain LoRA
    "bs-cosine": ["--res_type", "bs", "--shortcut_schedule", "cosine"],
    "is-cosine": ["--res_type", "is", "--shortcut_schedule", "cosine"],
    "ms-cosine": ["--res_type", "ms", "--shortcut_schedule", "cosine"],
}
BASELINE = "lora"

logger = logging.getLogger("compare_lm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", nargs="+", default=list(EXAMPLES), choices=list(EXAMPLES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one torch thread each")
    p.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "compare_lm")
    p.add_argument(
        "--method_lr",
        nargs="+",
        default=[],
        metavar="METHOD=LR",
        help="a method's own --learning_rate (each method at its tuned rate), over the examples' "
        "and the flags after --",
    )
    p.add_argument("example_args", nargs="*", help="more flags for the examples, after --")
    args = p.parse_args(argv)
    args.method_lr = method_rates(p, args.method_lr)
    return args


def method_rates(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, float]:
    """``{method: rate}`` from ``METHOD=LR`` pairs (a parser error names a malformed one)."""
    rates = {}
    for pair in pairs:
        method, _, rate = pair.partition("=")
        try:
            rates[method] = float(rate)
        except ValueError:
            parser.error(f"--method_lr {pair}: expected METHOD=LR with a number, e.g. lora=6e-3")
        if method not in METHODS:
            parser.error(f"--method_lr {pair}: unknown method {method!r}; known: {', '.join(METHODS)}")
    return rates


def load_example(script: str):
    spec = importlib.util.spec_from_file_location(script, ROOT / "examples" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_one(example: str, method: str, seed: int, args: argparse.Namespace) -> dict:
    """One example, method and seed (one torch thread): ``{"trained": metric, "exports":
    {merge: {"exported": metric, "merge_error": e}}, "seconds": wall time}``, kept as
    ``result.json`` in the run folder (written whole or not at all)."""
    path = run_dir(example, method, seed, args) / "result.json"
    if path.is_file():
        return json.loads(path.read_text())
    spec = EXAMPLES[example]
    start = time.time()
    (scores,) = load_example(spec.script).main(example_argv(example, method, seed, args)).values()
    result = {
        "trained": scores[spec.metric],
        "exports": {
            merge: {"exported": e[f"peft_{spec.metric}"], "merge_error": e["merge_error"]}
            for merge, e in scores["exports"].items()
        },
        "seconds": time.time() - start,
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    return result


def run_dir(example: str, method: str, seed: int, args: argparse.Namespace) -> Path:
    """The run folder of one example, method and seed under ``--output_dir``."""
    return args.output_dir / example / f"{method}-seed{seed}"


def example_argv(example: str, method: str, seed: int, args: argparse.Namespace) -> list[str]:
    """The example's flags for one run: the method's, the seed and folder, the flags after ``--``,
    then the method's own ``--method_lr`` (argparse keeps the last of a repeated flag)."""
    out = run_dir(example, method, seed, args)
    argv = [*METHODS[method], "--seed", str(seed), "--output_dir", str(out), "--num_threads", "1"]
    argv += args.example_args
    if method in args.method_lr:
        argv += ["--learning_rate", str(args.method_lr[method])]
    return argv


def interval_rows(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Rows ``method`` (its first export, the calibrated merge) and ``method+<merge>`` (further
    exports); per row the mean and 95 % bootstrap interval over seeds of the trained metric, the
    exported metric, its paired difference to the baseline's export of the same seed (``runs``
    of every method in the same seed order) and the merge error."""
    rows = {}
    baseline = None
    if BASELINE in results:  # the baseline's (only) export, per seed
        baseline = [next(iter(b["exports"].values()))["exported"] for b in results[BASELINE]]
    for method, runs in results.items():
        merges = list(runs[0]["exports"])
        for i, merge in enumerate(merges):
            exported = [r["exports"][merge]["exported"] for r in runs]
            row = rows[method if i == 0 else f"{method}+{merge}"] = {
                "trained": bootstrap_interval([r["trained"] for r in runs]),
                "exported": bootstrap_interval(exported),
                "merge_error": bootstrap_interval([r["exports"][merge]["merge_error"] for r in runs]),
            }
            if baseline is not None:
                diffs = [e - b for e, b in zip(exported, baseline, strict=True)]
                row["vs_baseline"] = bootstrap_interval(diffs)
    return rows


def markdown(tables: dict[str, dict], seeds: list[int], rates: dict[str, float] | None = None) -> str:
    rates_text = ", ".join(f"{m} {r:g}" for m, r in (rates or {}).items())
    lines = [
        f"Seeds {seeds}; mean over seeds [95 % bootstrap interval]. Trained: the model with its "
        "shortcuts; exported: the PEFT adapter loaded with `PeftModel.from_pretrained`; difference: "
        f"exported minus {BASELINE}'s export of the same seed; merge error: relative output error "
        "of the export on held-out batches."
        + (f" Learning rates of their own: {rates_text}." if rates_text else "")
        + "\n"
    ]
    for example, rows in tables.items():
        spec = EXAMPLES[example]
        lines += [
            f"\n{example} (`examples/{spec.script}.py`, {spec.metric})\n",
            f"| method | trained | exported | exported - {BASELINE} | merge error |",
            "|---|---|---|---|---|",
        ]
        for name, row in rows.items():
            diff = row.get("vs_baseline")
            cells = [
                _interval(row["trained"]),
                _interval(row["exported"]),
                "n/a" if diff is None else _interval(diff, "+"),
                f"{row['merge_error'][0]:.2e}",
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _interval(value: tuple[float, float, float], sign: str = "") -> str:
    mean, low, high = value
    return f"{mean:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runs = [(e, m, s) for e in args.examples for m in args.methods for s in args.seeds]
    for example in args.examples:
        (args.output_dir / example).mkdir(parents=True, exist_ok=True)
    # spawn: each run starts from a fresh interpreter, as a user's single run would
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {run: pool.submit(run_one, *run, args) for run in runs}
        for (example, method, seed), future in futures.items():
            future.result()
            logger.info("%s %s seed %d done", example, method, seed)
    tables = {
        e: interval_rows({m: [futures[(e, m, s)].result() for s in args.seeds] for m in args.methods})
        for e in args.examples
    }
    text = markdown(tables, args.seeds, args.method_lr)
    (args.output_dir / "compare_lm.md").write_text(text)
    (args.output_dir / "compare_lm.json").write_text(json.dumps(tables, indent=1))
    print(text)
    return tables


if __name__ == "__main__":
    main()
