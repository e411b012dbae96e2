#!/usr/bin/env python
"""Read a tiny base on fresh seeds: open-set prompt accuracy with 95 % intervals, against its bar.

    python scripts/read_base.py BASE [--seed-sets 100 200 300 400 500] [--output reading.json] [--card]

A model card reads its base on seeds 0-7, the seeds a recipe gets chosen on, and 72 held-out
images have a binomial standard error of about 4 points at 87 %. This reads the held-out colour x
shape pairs on eight fresh seeds per set (``s`` ... ``s + 7``) and the seen pairs on each set's
first four, at the card's settings (20 steps, guidance 4), and reports every set, the pooled
accuracy with its Wilson 95 % interval, and each colour x shape pair on its own. ``BASE`` is any
pipeline folder of the two families (``DiffusionPipeline.from_pretrained``). ``--card`` writes the
reading into the base's model card (``BASE/README.md``) as its "Fresh reading" section.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from reslora_diffusers.data import (
    BASE_ACCURACY_BAR,
    BASE_GUIDANCE_SCALE,
    BASE_NUM_INFERENCE_STEPS,
    heldout_base_prompts,
    seen_base_prompts,
)
from reslora_diffusers.eval import evaluate_pipeline, parse_prompt, wilson_interval
from reslora_diffusers.utils.io import atomic_path


def pooled(correct: list[bool]) -> dict:
    """Correct images, images, accuracy and its Wilson interval."""
    hits, images = sum(correct), len(correct)
    return {
        "correct": hits,
        "images": images,
        "accuracy": hits / images,
        "interval": wilson_interval(hits, images),
    }


def read_base(
    pipe, seed_sets: list[int], heldout_seeds: int = 8, seen_seeds: int = 4, **generate_kwargs
) -> dict:
    """Evaluate the held-out and the seen pairs on every set of seeds; pooled readings with
    intervals, per set, and per colour x shape pair of each (``"red triangle"``...)."""
    prompts = {"heldout": heldout_base_prompts(), "seen": seen_base_prompts()}
    per_set, all_correct = [], defaultdict(list)
    pairs = {name: defaultdict(list) for name in prompts}
    for start in seed_sets:
        row = {"seeds": start}
        for name, count in (("heldout", heldout_seeds), ("seen", seen_seeds)):
            result = evaluate_pipeline(pipe, prompts[name], range(start, start + count), **generate_kwargs)
            row[name] = result["accuracy"]
            all_correct[name] += result["correct"]
            for prompt, hit in zip(result["prompts"], result["correct"], strict=True):
                parsed = parse_prompt(prompt)
                pairs[name][f"{parsed['color']} {parsed['shape']}"].append(hit)
        per_set.append(row)
    reading = {name: pooled(correct) for name, correct in all_correct.items()}
    for name, by_pair in pairs.items():
        reading[f"{name}_pairs"] = {pair: pooled(correct) for pair, correct in by_pair.items()}
    reading["sets"] = per_set
    return reading


def verdict(reading: dict) -> str:
    """Each set against :data:`BASE_ACCURACY_BAR`: above or below it, and whether the interval
    reaches across it (then more seeds could still move the verdict)."""
    parts = []
    for name, bar in BASE_ACCURACY_BAR.items():
        r = reading[name]
        side = "meets" if r["accuracy"] >= bar else "below"
        low, high = r["interval"]
        sure = "the interval clear of it" if not low <= bar <= high else "the interval spans it"
        parts.append(f"{name} {r['accuracy']:.1%} [{low:.1%}, {high:.1%}] {side} its bar {bar:.0%} ({sure})")
    return "; ".join(parts)


def markdown(reading: dict) -> str:
    lines = ["| seeds | held-out | seen |", "|---|---|---|"]
    for row in reading["sets"]:
        lines.append(f"| {row['seeds']}- | {row['heldout']:.1%} | {row['seen']:.1%} |")
    for name in ("heldout", "seen"):
        r = reading[name]
        low, high = r["interval"]
        lines.append(f"\n{name}: {r['correct']}/{r['images']} = {r['accuracy']:.1%} [{low:.1%}, {high:.1%}]")
        for pair, by_pair in reading[f"{name}_pairs"].items():
            lines.append(f"  {pair}: {by_pair['correct']}/{by_pair['images']} = {by_pair['accuracy']:.1%}")
    return "\n".join(lines) + "\n\n" + verdict(reading)


CARD_HEADING = "## Fresh reading"


def card_section(reading: dict) -> str:
    """The model card's "Fresh reading" section: each set of prompts pooled with its interval and
    its bar, their colour x shape pairs one by one, and the verdict."""
    settings = reading["settings"]
    starts = ", ".join(str(start) for start in settings["seed_sets"])
    lines = [
        CARD_HEADING,
        "",
        f"Open-set prompt accuracy on fresh seeds (`scripts/read_base.py`): the held-out pairs on seeds "
        f"s ... s + {settings['heldout_seeds'] - 1} and the seen pairs on s ... s + {settings['seen_seeds'] - 1} "
        f"for s = {starts}; {settings['steps']} steps, guidance {settings['guidance']:g}. The interval is "
        "Wilson's 95 % score interval.",
        "",
        "| prompts | images | accuracy | its 95 % interval | bar |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("heldout", "held-out pairs"), ("seen", "seen pairs")):
        r = reading[name]
        low, high = r["interval"]
        lines.append(
            f"| {label} | {r['images']} | {r['accuracy']:.1%} | [{100 * low:.1f}, {100 * high:.1f}] % "
            f"| {BASE_ACCURACY_BAR[name]:.0%} |"
        )
    lines.append("")
    for name, label in (("heldout", "Held-out"), ("seen", "Seen")):
        pairs = "; ".join(
            f"{pair} {r['accuracy']:.1%} ({r['correct']} of {r['images']})"
            for pair, r in reading[f"{name}_pairs"].items()
        )
        lines.append(f"{label} pairs one by one: {pairs}.")
    lines += ["", verdict(reading) + "."]
    return "\n".join(lines) + "\n"


def write_card_section(card: Path, reading: dict) -> None:
    """Put :func:`card_section` at the end of ``card``, in place of an earlier one (written to a
    temporary name, then renamed)."""
    text = card.read_text()
    if CARD_HEADING in text:
        before, _, after = text.partition(CARD_HEADING)
        rest = after.split("\n## ", 1)
        text = before + (("## " + rest[1]) if len(rest) > 1 else "")
    text = text.rstrip("\n") + "\n\n" + card_section(reading)
    with atomic_path(card) as tmp:
        tmp.write_text(text)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("base", type=Path, help="a pipeline folder")
    parser.add_argument("--seed-sets", type=int, nargs="+", default=[100, 200, 300, 400, 500])
    parser.add_argument("--heldout-seeds", type=int, default=8, help="seeds per set for the held-out pairs")
    parser.add_argument("--seen-seeds", type=int, default=4, help="seeds per set for the seen pairs")
    parser.add_argument("--steps", type=int, default=BASE_NUM_INFERENCE_STEPS)
    parser.add_argument("--guidance", type=float, default=BASE_GUIDANCE_SCALE)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, help="also write the reading as JSON here")
    parser.add_argument(
        "--card",
        action="store_true",
        help="write the reading into BASE/README.md (its Fresh reading section)",
    )
    args = parser.parse_args(argv)
    if not (args.base / "model_index.json").is_file():
        parser.error(f"{args.base}: not a pipeline folder (no model_index.json)")
    if args.card and not (args.base / "README.md").is_file():
        parser.error(f"--card: {args.base} has no model card (README.md)")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = DiffusionPipeline.from_pretrained(args.base)
    reading = read_base(
        pipe,
        args.seed_sets,
        args.heldout_seeds,
        args.seen_seeds,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
    )
    settings = ("seed_sets", "heldout_seeds", "seen_seeds", "steps", "guidance")
    reading["settings"] = {"base": str(args.base), **{key: getattr(args, key) for key in settings}}
    if args.output:
        with atomic_path(args.output) as tmp:
            tmp.write_text(json.dumps(reading, indent=2))
    if args.card:
        write_card_section(args.base / "README.md", reading)
    print(markdown(reading))
    return reading


if __name__ == "__main__":
    main()
