"""benchmarks/compare_methods.py: the summary maths on hand-made runs."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = _load("compare_methods")


def _run(losses, accuracy, unmerged=None, merge_error=None):
    return {
        "loss": losses,
        "accuracy": dict(zip([0, 10, 20], accuracy)),
        "unmerged_accuracy": unmerged,
        "merge_error": merge_error,
        "seconds": 60.0,
    }


def test_summary_pairs_losses_by_seed_and_finds_steps_to_the_baseline():
    base = [_run([1.0] * 20, [0.0, 0.2, 0.4]), _run([3.0] * 20, [0.0, 0.2, 0.6])]
    # 0.1 and 0.3 below the same seed's baseline: a paired difference of -0.2 +- 0.1, although the
    # losses themselves spread by 0.9 between seeds
    other = [
        _run([1.0] * 10 + [0.9] * 10, [0.0, 0.5, 0.5], 0.7, 1e-3),
        _run([3.0] * 10 + [2.7] * 10, [0.0, 0.6, 0.7], 0.5, 2e-3),
    ]
    table = compare.summarise({"peft-lora": base, "ms": other})
    ms = table["ms"]
    assert ms["final_loss"] == pytest.approx((1.8, 0.9))
    assert ms["loss_vs_baseline"] == pytest.approx((-0.2, 0.1))
    assert table["peft-lora"]["loss_vs_baseline"] == pytest.approx((0.0, 0.0))
    assert ms["unmerged_accuracy"] == pytest.approx((0.6, 0.1))
    assert table["peft-lora"]["unmerged_accuracy"] is None
    # the baseline ends at a mean 0.5; ms's mean curve (0, 0.55, 0.6) reaches it at step 10
    assert ms["steps_to_baseline"] == 10 and table["peft-lora"]["steps_to_baseline"] == 20

    args = argparse.Namespace(seeds=[0, 1], max_train_steps=20, num_validation_images=1, validation_steps=10)
    text = compare.markdown(table, args)
    assert (
        "| ms | 1.8000 +- 0.9000 | -0.20000 +- 0.10000 | 60.0% +- 10.0% | 60.0% +- 10.0% | 10 | 2.0e-03 (max) |"
        in text
    )
