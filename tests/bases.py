"""Checks the tests of the committed bases share: configs against the builders', and an
exported LoRA loaded into a DiT base."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from reslora_diffusers.data import BASE_RESOLUTION
from tests.runs import PROMPT

_TRANSFORMERS_BOOKKEEPING = {"_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version"}


def transformers_config(model) -> dict:
    """A transformers model's config as a dict, without the bookkeeping keys that vary by version."""
    return {k: v for k, v in model.config.to_dict().items() if k not in _TRANSFORMERS_BOOKKEEPING}


def public_config(config) -> dict:
    """A diffusers config as plain JSON values, without the private bookkeeping keys."""
    return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if not k.startswith("_")}


def assert_export_loads_and_changes_the_image(base: Path, run: Path) -> None:
    """``run``'s exported LoRA holds transformer keys only, and the base pipeline loads it and
    draws a different image of the documented size with the same seed."""
    weights = load_file(run / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"transformer"}
    pipe = StableDiffusion3Pipeline.from_pretrained(base)
    plain = StableDiffusion3Pipeline.from_pretrained(base)
    pipe.load_lora_weights(run)
    args = dict(prompt=PROMPT, num_inference_steps=2, output_type="pt")
    with torch.no_grad():
        tuned = pipe(**args, generator=torch.manual_seed(0)).images
        before = plain(**args, generator=torch.manual_seed(0)).images
    assert tuned.shape == (1, 3, BASE_RESOLUTION, BASE_RESOLUTION) and (tuned - before).abs().max() > 0


def fresh_reading_in_card(folder: Path) -> dict:
    """``folder``'s ``fresh_reading.json`` (``scripts/read_base.py --output``), after checking that
    its model card's *Fresh reading* section (``--card``) gives the same pooled readings."""
    reading = json.loads((folder / "fresh_reading.json").read_text())
    card = (folder / "README.md").read_text()
    fresh = card[card.index("## Fresh reading") :]
    for name, label in (("heldout", "held-out pairs"), ("seen", "seen pairs")):
        r = reading[name]
        assert f"| {label} | {r['images']} | {r['accuracy']:.1%} |" in fresh, name
    return reading
