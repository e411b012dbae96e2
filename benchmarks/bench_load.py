"""Training-step time of the default run on an idle CPU and beside one CPU-bound process.

Runs ``train_text_to_image.py`` (its default run, or with the flags after ``--``) for
``--steps`` steps in a fresh process per measurement, reads the step times from its
``train_log.jsonl`` and stops it once the steps are done (the export is not timed). The
settings (``--settings``, default all):

* ``old``: OpenMP's default wait policy (idle threads spin for a while before they sleep) and
  torch's thread count, fixed (``--cpu_threads torch``): the script before it cared about load;
* ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep at once), the count fixed;
* ``passive-auto``: ``OMP_WAIT_POLICY=PASSIVE`` and threads following the free CPUs;
* ``new``: the script as a user runs it (its defaults: OpenMP's wait policy, ``--cpu_threads
  auto``).

Each is measured idle and with one competing ``python -c "while True: pass"`` process that
the benchmark starts and kills, interleaved over ``--rounds``. The table gives the median
milliseconds per step of steps 11..N and the ratios (busy / idle, each setting / old).

    python benchmarks/bench_load.py [--steps 60] [--rounds 1] [--settings old new] [-- TRAINING FLAGS]

Run it on an otherwise idle machine, without ``OMP_NUM_THREADS`` set (torch's default threads
are what a user gets): other load changes every number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "train_text_to_image.py"
#: the first steps are warm-up (allocator, first validation's leftovers); steps after this are timed
FIRST_TIMED_STEP = 11
#: setting -> (``OMP_WAIT_POLICY``, ``--cpu_threads``); None: not set (OpenMP's, the script's default)
SETTINGS = {
    "old": (None, "torch"),
    "passive": ("PASSIVE", "torch"),
    "passive-auto": ("PASSIVE", "auto"),
    "new": (None, None),
}
LOADS = ("idle", "busy")


def command(setting: str, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one measurement."""
    policy, threads = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    extra = [] if threads is None else ["--cpu_threads", threads]
    return [sys.executable, str(SCRIPT), *argv, *extra], env


def step_times(records: list[dict], first: int = FIRST_TIMED_STEP) -> list[float]:
    """Seconds of each step from ``first`` on, from the cumulative ``time`` of the log's step records."""
    times = {r["step"]: r["time"] for r in records if "loss" in r and "time" in r}
    return [times[s] - times[s - 1] for s in sorted(times) if s >= first and s - 1 in times]


def summarize(medians: dict[tuple[str, str], float], settings: list[str]) -> str:
    """A markdown table of the median ms per step per (setting, load), with the ratios to ``old``
    (when it was measured) and busy / idle."""
    ref = "old" if "old" in settings else None
    lines = [
        "| setting | idle ms/step | busy ms/step | busy / idle | idle / old | busy / old |",
        "|---|---|---|---|---|---|",
    ]
    for setting in settings:
        idle, busy = medians[(setting, "idle")], medians[(setting, "busy")]
        vs = [f"{medians[(setting, load)] / medians[(ref, load)]:.2f}x" if ref else "n/a" for load in LOADS]
        lines.append(f"| {setting} | {idle:.0f} | {busy:.0f} | {busy / idle:.2f}x | {vs[0]} | {vs[1]} |")
    return "\n".join(lines)


def measure(setting: str, busy: bool, steps: int, train_args: list[str]) -> list[float]:
    """Step times of one run of the script (in a temporary output folder)."""
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        argv = ["--output_dir", str(out), "--max_train_steps", str(steps), "--report_to", "none"]
        argv += ["--checkpointing_steps", str(10 * steps), *train_args]
        # stderr to a file: a pipe nobody reads would block the script once full
        stderr = (Path(tmp) / "stderr.txt").open("w+")
        cmd, env = command(setting, argv)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            records = _wait_for_steps(proc, out, steps, stderr)
        finally:
            stderr.close()
            proc.kill()
            proc.wait()
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    return step_times(records)


def _wait_for_steps(proc: subprocess.Popen, out: Path, steps: int, stderr) -> list[dict]:
    """The training log of the run writing ``out`` once it holds ``steps`` steps (a last line
    being written is left for the next look)."""
    from reslora_diffusers.training.run_folder import RunFolder

    while True:
        records = RunFolder(out).read_log()
        if sum("loss" in r for r in records) >= steps:
            return records
        if proc.poll() is not None:
            stderr.seek(0)
            err = stderr.read().strip().splitlines()
            raise RuntimeError(f"the training script stopped: {err[-1] if err else proc.returncode}")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help=f"steps per run (timed: {FIRST_TIMED_STEP}..N)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of every run")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = p.parse_args(own)
    if args.steps < FIRST_TIMED_STEP + 1:
        p.error(
            f"--steps {args.steps}: at least {FIRST_TIMED_STEP + 1} (steps {FIRST_TIMED_STEP}..N are timed)"
        )
    times: dict[tuple[str, str], list[float]] = {(s, load): [] for s in args.settings for load in LOADS}
    for round_ in range(args.rounds):
        for load in LOADS:
            for setting in args.settings:
                got = measure(setting, load == "busy", args.steps, train_args)
                times[(setting, load)] += got
                print(
                    f"round {round_ + 1}, {setting}, {load}: {1000 * statistics.median(got):.0f} ms/step",
                    flush=True,
                )
    medians = {key: 1000 * statistics.median(values) for key, values in times.items()}
    print(f"\npython benchmarks/bench_load.py {' '.join(argv)}  ({os.cpu_count()} CPUs)\n")
    print(summarize(medians, args.settings))


if __name__ == "__main__":
    main()
