"""scripts/read_base.py: a base's open-set reading on fresh seeds, with Wilson intervals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from reslora_diffusers.data import default_base_model_path, heldout_base_prompts, seen_base_prompts
from reslora_diffusers.eval import evaluate_pipeline, wilson_interval
from tests.scripts import load_script

read_base = load_script(Path(__file__).resolve().parent.parent / "scripts" / "read_base.py")


def test_the_wilson_interval_is_the_textbook_one():
    z = 1.959964
    # no successes: the lower end is 0 and the upper z^2 / (n + z^2)
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(z**2 / (10 + z**2))
    # the score interval solves |p - q| = z sqrt(q (1 - q) / n) for q: both ends satisfy it
    k, n = 314, 360
    for q in wilson_interval(k, n):
        assert abs(k / n - q) == pytest.approx(z * math.sqrt(q * (1 - q) / n))
    # and it is symmetric under swapping successes and failures
    low, high = wilson_interval(k, n)
    swapped = wilson_interval(n - k, n)
    assert low == pytest.approx(1 - swapped[1]) and high == pytest.approx(1 - swapped[0])
    with pytest.raises(ValueError, match="wilson_interval: 3 correct of 2 images"):
        wilson_interval(3, 2)


def test_a_base_is_read_per_set_pooled_and_per_held_out_pair(tmp_path, capsys):
    base = default_base_model_path()
    out = tmp_path / "reading" / "fresh.json"
    args = [str(base), "--seed-sets", "100", "300", "--heldout-seeds", "1", "--seen-seeds", "1"]
    reading = read_base.main([*args, "--steps", "2", "--threads", "1", "--output", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(reading))
    assert not list(out.parent.glob("*.tmp*"))
    # the same images through evaluate_pipeline directly: its accuracy is the reading's
    pipe = StableDiffusionPipeline.from_pretrained(base)
    for name, prompts in (("heldout", heldout_base_prompts()), ("seen", seen_base_prompts())):
        direct = [
            evaluate_pipeline(pipe, prompts, [s], num_inference_steps=2, guidance_scale=4.0)
            for s in (100, 300)
        ]
        assert [row[name] for row in reading["sets"]] == pytest.approx([d["accuracy"] for d in direct])
        assert reading[name]["images"] == 2 * len(prompts)
        assert reading[name]["accuracy"] == pytest.approx(sum(d["accuracy"] for d in direct) / 2)
    pairs = reading["heldout_pairs"]
    assert sorted(pairs) == ["blue circle", "green square", "red triangle"]
    assert all(p["images"] == 6 for p in pairs.values())  # three backgrounds, two sets of one seed
    assert sum(p["correct"] for p in pairs.values()) == reading["heldout"]["correct"]
    seen = reading["seen_pairs"]
    assert len(seen) == 12 and not set(seen) & set(pairs)  # five colours x three shapes, less the held-out
    assert all(p["images"] == 6 for p in seen.values())
    assert sum(p["correct"] for p in seen.values()) == reading["seen"]["correct"]
    printed = capsys.readouterr().out
    assert "| 100- |" in printed and "its bar 90%" in printed and "its bar 95%" in printed


def test_a_folder_that_is_not_a_pipeline_stops_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        read_base.main([str(tmp_path)])
    assert f"{tmp_path}: not a pipeline folder (no model_index.json)" in capsys.readouterr().err


def test_the_reading_goes_into_the_model_card_once_before_nothing_else(tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(default_base_model_path(), base)
    args = [str(base), "--seed-sets", "100", "--heldout-seeds", "1", "--seen-seeds", "1", "--steps", "2"]
    reading = read_base.main([*args, "--threads", "1", "--card"])
    card = (base / "README.md").read_text()
    section = card[card.index("## Fresh reading") :]
    heldout, seen = reading["heldout"], reading["seen"]
    low, high = heldout["interval"]
    row = f"| held-out pairs | {heldout['images']} | {heldout['accuracy']:.1%} | [{100 * low:.1f}, {100 * high:.1f}] % | 90% |"
    assert row in section and f"| seen pairs | {seen['images']} | {seen['accuracy']:.1%} |" in section
    assert "for s = 100; 2 steps, guidance 4" in section
    for name in ("heldout", "seen"):
        pair, by_pair = next(iter(reading[f"{name}_pairs"].items()))
        assert f"{pair} {by_pair['accuracy']:.1%} ({by_pair['correct']} of {by_pair['images']})" in section
    # written again after a later section: one reading, at the end, the other section kept
    (base / "README.md").write_text(card + "\n## Notes\n\nkept\n")
    read_base.write_card_section(base / "README.md", reading)
    again = (base / "README.md").read_text()
    assert again.count("## Fresh reading") == 1 and "## Notes\n\nkept" in again
    assert again.endswith(section) and again.startswith(card[: card.index("## Fresh reading")])
    assert not list(base.glob("*.tmp*"))


def test_card_needs_a_model_card(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit):
        read_base.main([str(tmp_path), "--card"])
    assert f"--card: {tmp_path} has no model card (README.md)" in capsys.readouterr().err
