"""Export a ResLoRA-trained pipeline as standard LoRA files, with an honest merge report.

Writes into ``output_dir`` (atomically: nothing appears there unless every file was made) one
file per format (:mod:`.formats`; by default those the pipeline family declares):

* ``pytorch_lora_weights.safetensors`` (:mod:`.diffusers`): diffusers/PEFT keys, scale baked into
  ``lora_B``, so ``pipe.load_lora_weights(output_dir)`` gives the merged model with no extra
  arguments;
* ``lora_kohya.safetensors`` (:mod:`.kohya`, Stable Diffusion and SDXL): kohya-ss sd-scripts keys
  and ``ss_*`` metadata, plus ``reslora_*`` provenance; SD3 and Flux have the diffusers file
  only, which diffusers and ComfyUI both load;

and ``merge_report.json``: per component and merge method, the relative output error of the
merged model against the ResLoRA model on held-out inputs, in total and per chain.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

from ..core import get_state, traced_state
from ..core.keys import lora_factors, lora_key, lora_paths
from ..frontends import components_family, frontend_for
from ..merge import (
    DEFAULT_DISTILL_STEPS,
    MergedLoRA,
    has_norm_windows,
    merge_to_lora,
    reference_outputs,
    relative_error,
)
from ..utils.io import atomic_dir
from .formats import REPORT_FILE, get_format, lora_formats

logger = logging.getLogger(__name__)

#: the one-pass merges a report compares for types that merge approximately
_COMPARED = ("input", "weight", "calibrated")

Batches = dict[str, Iterable]


def export_lora(
    output_dir: str | Path,
    *,
    merge: str | None = None,
    calibration: Batches | None = None,
    formats: Iterable[str] | None = None,
    eval_inputs: Batches | None = None,
    rank: int | None = None,
    metadata: dict[str, str] | None = None,
    chain_report: bool = True,
    distill_steps: int = DEFAULT_DISTILL_STEPS,
    **components: nn.Module | None,
) -> dict:
    """Merge each component's ResLoRA into a plain LoRA and write the files (see module doc).

    Args:
        components: the pipeline components with ResLoRA by their pipeline names
            (``unet=..., text_encoder=..., text_encoder_2=...``, or ``transformer=...`` for SD3
            and Flux); ``None`` values are skipped.
        formats: names of registered formats (``diffusers``, ``kohya``); default: those the
            pipeline family declares (both for Stable Diffusion and SDXL, the diffusers file for
            SD3 and Flux).
        calibration: ``{component: batches}`` for ``merge="calibrated"`` (keyword batches, as
            passed to the component); components without batches get synthetic ones.
        eval_inputs: ``{component: batches}`` held out for the report (synthetic where missing).
        rank: truncate merged updates (``bs`` stacks to rank ``(m+1) r``) to this rank by SVD.
        chain_report: also measure each chain merged alone (one forward per chain and merge
            method on the held-out inputs); ``False`` keeps the per-method totals only, for
            large models where those forwards dominate the export time.
        distill_steps: Adam steps of ``merge="distill"`` (fitted on the calibration batches).
    Returns:
        the report written to ``merge_report.json``.
    """
    comps = {k: v for k, v in components.items() if v is not None}
    formats = check_formats(formats, comps)
    merged, report = merge_components(
        comps, merge, calibration, eval_inputs, rank, chain_report, distill_steps
    )
    with atomic_dir(output_dir) as tmp:
        write_lora_files(tmp, merged, report, comps, formats, metadata)
    return report


def check_formats(formats: Iterable[str] | None, comps: dict[str, nn.Module]) -> tuple[str, ...]:
    """The formats to write for ``comps`` (None: their pipeline family's), checked against it."""
    if not comps:
        raise ValueError("export needs at least one component with ResLoRA (e.g. unet=...)")
    family = components_family(comps)
    formats = family.formats if formats is None else tuple(formats)
    names = tuple(f.name for f in lora_formats())
    if not formats or any(f not in names for f in formats):
        raise ValueError(f"formats={formats!r}: allowed values are {names}")
    family.check_components(comps)
    for name in formats:
        if not get_format(name).applies_to(family):
            raise ValueError(get_format(name).refusal(family))
    return formats


def merge_components(
    comps: dict[str, nn.Module],
    merge: str | None = None,
    calibration: Batches | None = None,
    eval_inputs: Batches | None = None,
    rank: int | None = None,
    chain_report: bool = True,
    distill_steps: int = DEFAULT_DISTILL_STEPS,
) -> tuple[dict[str, MergedLoRA], dict]:
    """``({component: plain LoRA}, report)`` for ``{component: model with ResLoRA}``."""
    if not comps:
        raise ValueError("export needs at least one component with ResLoRA (e.g. unet=...)")
    method = merge or get_state(next(iter(comps.values()))).config.merge
    merged, report = {}, {"merge": method, "components": {}}
    for i, (name, module) in enumerate(comps.items()):
        config = traced_state(module).config
        report.update(res_type=config.res_type, pre_num=config.pre_num, rank=config.rank)
        family = frontend_for(module)
        given = (eval_inputs or {}).get(name)
        evals = list(given or family.synthetic_inputs(module, seed=1000 + i))
        calib = list((calibration or {}).get(name) or family.synthetic_inputs(module, seed=i))
        merged[name] = merge_to_lora(
            module, method, calibration=calib, rank=rank, eval_inputs=evals, distill_steps=distill_steps
        )
        report["components"][name] = component_report(
            module, merged[name], method, calib, evals, rank, chain_report
        )
        if merged[name].report.distill:
            report["components"][name]["distill"] = merged[name].report.distill
        report["components"][name]["eval_inputs"] = "given" if given else "synthetic"
    shortcut = traced_state(next(iter(comps.values()))).shortcut
    errors = ", ".join(f"{k} {v['output_error']:.2e}" for k, v in report["components"].items())
    if shortcut.plain:
        logger.info("%s exported (nothing to merge): relative output error %s", shortcut.label, errors)
    else:
        logger.info(
            "%s merged into a plain LoRA (%s): relative output error %s", shortcut.label, method, errors
        )
    return merged, report


def write_lora_files(
    out: Path,
    merged: dict[str, MergedLoRA],
    report: dict,
    comps: dict[str, nn.Module],
    formats: tuple[str, ...] = ("diffusers",),
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the chosen formats and ``merge_report.json`` into the directory ``out``."""
    files = {name: file_keys(comps[name], lora) for name, lora in merged.items()}
    for name in formats:
        fmt = get_format(name)
        fmt.write(out / fmt.file_name, files, comps, report, metadata)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def file_keys(module: nn.Module, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``lora`` with module paths as LoRA files of the module's family spell them."""
    family = frontend_for(module)
    out = {}
    for path in lora_paths(lora):
        a, b = lora_factors(lora, path)
        name = family.file_path(module, path)
        out[lora_key(name, "A")], out[lora_key(name, "B")] = a, b
    return out


def component_report(
    module: nn.Module,
    merged: MergedLoRA,
    method: str,
    calib: list,
    evals: list,
    rank: int | None,
    chains: bool = True,
) -> dict:
    """Relative output error of the exported merge, and of every applicable merge method,
    in total and (``chains``) with only one chain merged at a time."""
    state = get_state(module)
    methods = [method]
    if not (state.shortcut.exact_merge or state.shortcuts_off()):
        # the one-pass merges always, for comparison; the sequential one only when chosen (costly)
        methods = [m for m in _COMPARED if m == method or m != "input" or has_norm_windows(module)]
        methods += [method] if method not in _COMPARED else []
    per_method = {}
    ref = reference_outputs(module, evals)
    for m in methods:
        lora = merged if m == method else merge_to_lora(module, m, calibration=calib, rank=rank)
        total = merged.report.output_error if m == method else relative_error(module, lora, evals, ref)
        per_method[m] = {"total": total}
        if chains:
            per_method[m]["chains"] = {
                chain_name: relative_error(module, _subset(lora, chain.blocks), evals, ref)
                for chain_name, chain in state.chains.items()
            }
    return {
        "output_error": merged.report.output_error,
        "methods": per_method,
        "ranks": sorted(set(merged.report.ranks.values())),
        "truncation_max": max(merged.report.truncation.values(), default=0.0),
    }


def _subset(lora: dict, blocks) -> dict:
    keys = {lora_key(b.module_path, ab) for b in blocks for ab in "AB"}
    return {k: v for k, v in lora.items() if k in keys}


def fuse_lora(model: nn.Module, lora: dict[str, torch.Tensor]) -> nn.Module:
    """Add ``B @ A`` of a plain LoRA into the weights of a model without adapters (in place).

    Convolution factors (``A`` ``(r, in, kh, kw)``, ``B`` ``(out, r, 1, 1)``) fuse into the
    kernel. The result has the base model's architecture, so it runs at exactly its cost.
    """
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path in lora_paths(lora):
            key = lora_key(path, "A")
            if path not in modules:
                raise ValueError(f"fuse_lora: key {key!r} names no module of {type(model).__name__}")
            weight = modules[path].weight
            a, b = (t.to(torch.float32) for t in lora_factors(lora, path))
            delta = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
            if delta.numel() != weight.numel() or delta.shape[0] != weight.shape[0]:
                raise ValueError(
                    f"fuse_lora: key {key!r} gives shape {tuple(delta.shape)}, weight is {tuple(weight.shape)}"
                )
            weight += delta.reshape(weight.shape).to(weight.dtype)
    return model
