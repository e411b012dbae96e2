"""The README's code runs as written: its "Using the core" block is a complete script."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(heading: str) -> str:
    """The first ```python block after the README heading ``heading``."""
    text = README.read_text()
    section = text[text.index(f"\n## {heading}\n") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_using_the_core_runs_as_written_and_reports_the_merged_models_distance(tmp_path, monkeypatch, capsys):
    """Run in a fresh namespace (so nothing it names may be left undefined); then, with no merge
    code: the ResLoRA model's outputs on ``held_out``, the base model's weights plus ``B' A'`` of
    every exported layer, and ``||y_merged - y_reslora|| / ||y_reslora||`` against the report."""
    from reslora_diffusers import remove_reslora

    script = tmp_path / "using_the_core.py"
    script.write_text(readme_block("Using the core"))
    monkeypatch.chdir(tmp_path)
    names = runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out.strip()
    assert f"(it prints `{printed}`)" in README.read_text()  # the README says what it prints
    assert (tmp_path / "reslora.safetensors").is_file()

    model, lora, held_out = names["model"], names["lora"], names["held_out"]
    model.eval()
    with torch.no_grad():
        reslora = [model(input_ids=ids).logits.double() for ids in held_out]
        remove_reslora(model)
        weights = dict(model.named_parameters())
        for key in [k for k in lora if k.endswith(".lora_A.weight")]:
            path = key.removesuffix(".lora_A.weight")
            weights[f"{path}.weight"] += lora[f"{path}.lora_B.weight"] @ lora[key]
        merged = [model(input_ids=ids).logits.double() for ids in held_out]
    error = sum((m - r).square().sum() for m, r in zip(merged, reslora)).sqrt()
    error = float(error / sum(r.square().sum() for r in reslora).sqrt())
    assert len(lora) == 2 * 8  # q_proj and v_proj of 4 layers
    assert abs(error - lora.report.output_error) < 1e-4 * max(1.0, error)
    assert 0 < error < 1
