"""Export a ResLoRA-trained pipeline as standard LoRA files, with an honest merge report.

Writes into ``output_dir`` (atomically: nothing appears there unless every file was made):

* ``pytorch_lora_weights.safetensors``: diffusers/PEFT keys (``unet.<path>.lora_A.weight``,
  ``text_encoder.<path>.lora_B.weight``, ...), scale baked into ``lora_B``, so
  ``pipe.load_lora_weights(output_dir)`` gives the merged model with no extra arguments;
* ``lora_kohya.safetensors``: kohya-ss sd-scripts keys and ``ss_*`` metadata, plus ``reslora_*``
  provenance (res_type, pre_num, merge, fidelity);
* ``merge_report.json``: per component and merge method, the relative output error of the
  merged model against the ResLoRA model on held-out inputs, in total and per chain.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

from ..core.merge import MergedLoRA, merge_to_lora, reference_outputs, relative_error
from ..core.model import _traced_state, get_state
from ..utils.io import atomic_dir
from ..utils.safety import save_safetensors
from .kohya import base_model_version, kohya_state_dict

logger = logging.getLogger(__name__)

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
REPORT_FILE = "merge_report.json"
FORMATS = ("diffusers", "kohya")

Batches = dict[str, Iterable]


def synthetic_unet_batches(unet: nn.Module, num: int = 2, batch: int = 2, seed: int = 0) -> list[dict]:
    """UNet inputs with no data: N(0, 1) latents (the noisy-latent distribution at large t),
    uniform timesteps, N(0, 1) text states; SDXL's added conditioning where the UNet needs it."""
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    gen = torch.Generator().manual_seed(seed)
    device = unet.device
    out = []
    for _ in range(num):
        kwargs = {
            "sample": torch.randn(batch, cfg.in_channels, size, size, generator=gen),
            "timestep": torch.randint(0, 1000, (batch,), generator=gen),
            "encoder_hidden_states": torch.randn(batch, 16, cfg.cross_attention_dim, generator=gen),
        }
        if cfg.get("addition_embed_type") == "text_time":
            n_time = 6 * cfg.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(
                    batch, cfg.projection_class_embeddings_input_dim - n_time, generator=gen
                ),
                "time_ids": torch.rand(batch, 6, generator=gen) * size * 8,
            }
        out.append(_to(kwargs, device, unet.dtype))
    return out


def synthetic_text_batches(
    text_encoder: nn.Module, num: int = 2, batch: int = 4, seed: int = 0
) -> list[dict]:
    """Text-encoder inputs with no data: random token ids over the whole sequence length."""
    cfg = text_encoder.config
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(
                0, cfg.vocab_size, (batch, cfg.max_position_embeddings), generator=gen
            ).to(text_encoder.device)
        }
        for _ in range(num)
    ]


def _to(obj, device, dtype):
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    if torch.is_tensor(obj):
        return obj.to(device, dtype) if obj.is_floating_point() else obj.to(device)
    return obj


def default_batches(name: str, module: nn.Module, seed: int) -> list[dict]:
    if name == "unet":
        return synthetic_unet_batches(module, seed=seed)
    return synthetic_text_batches(module, seed=seed)


def export_lora(
    output_dir: str | Path,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    merge: str | None = None,
    calibration: Batches | None = None,
    formats: Iterable[str] = FORMATS,
    eval_inputs: Batches | None = None,
    rank: int | None = None,
    metadata: dict[str, str] | None = None,
    chain_report: bool = True,
) -> dict:
    """Merge each component's ResLoRA into a plain LoRA and write the files (see module doc).

    Args:
        calibration: ``{component: batches}`` for ``merge="calibrated"`` (keyword batches, as
            passed to the component); components without batches get synthetic ones.
        eval_inputs: ``{component: batches}`` held out for the report (synthetic where missing).
        rank: truncate merged updates (``bs`` stacks to rank ``(m+1) r``) to this rank by SVD.
        chain_report: also measure each chain merged alone (one forward per chain and merge
            method on the held-out inputs); ``False`` keeps the per-method totals only, for
            large models where those forwards dominate the export time.
    Returns:
        the report written to ``merge_report.json``.
    """
    comps = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    comps = {k: v for k, v in comps.items() if v is not None}
    formats = check_formats(formats)
    merged, report = merge_components(comps, merge, calibration, eval_inputs, rank, chain_report)
    with atomic_dir(output_dir) as tmp:
        write_lora_files(tmp, merged, report, comps, formats, metadata)
    return report


def check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats={formats!r}: allowed values are {FORMATS}")
    return formats


def merge_components(
    comps: dict[str, nn.Module],
    merge: str | None = None,
    calibration: Batches | None = None,
    eval_inputs: Batches | None = None,
    rank: int | None = None,
    chain_report: bool = True,
) -> tuple[dict[str, MergedLoRA], dict]:
    """``({component: plain LoRA}, report)`` for ``{component: model with ResLoRA}``."""
    if not comps:
        raise ValueError("export needs at least one of unet, text_encoder, text_encoder_2")
    method = merge or get_state(next(iter(comps.values()))).config.merge
    merged, report = {}, {"merge": method, "components": {}}
    for i, (name, module) in enumerate(comps.items()):
        config = _traced_state(module).config
        report.update(res_type=config.res_type, pre_num=config.pre_num, rank=config.rank)
        given = (eval_inputs or {}).get(name)
        evals = list(given or default_batches(name, module, seed=1000 + i))
        calib = list((calibration or {}).get(name) or default_batches(name, module, seed=i))
        merged[name] = merge_to_lora(module, method, calibration=calib, rank=rank, eval_inputs=evals)
        report["components"][name] = component_report(
            module, merged[name], method, calib, evals, rank, chain_report
        )
        report["components"][name]["eval_inputs"] = "given" if given else "synthetic"
    logger.info(
        "Merged %s ResLoRA (%s): relative output error %s",
        report["res_type"],
        method,
        {k: f"{v['fidelity']:.2e}" for k, v in report["components"].items()},
    )
    return merged, report


def write_lora_files(
    out: Path,
    merged: dict[str, MergedLoRA],
    report: dict,
    comps: dict[str, nn.Module],
    formats: tuple[str, ...] = FORMATS,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the chosen formats and ``merge_report.json`` into the directory ``out``."""
    merged = {name: canonical_keys(comps[name], lora) for name, lora in merged.items()}
    if "diffusers" in formats:
        flat = {
            f"{name}.{k}": v.detach().cpu().contiguous()
            for name, lora in merged.items()
            for k, v in lora.items()
        }
        save_safetensors(flat, out / DIFFUSERS_FILE, metadata={"format": "pt"})
    if "kohya" in formats:
        _write_kohya(out / KOHYA_FILE, merged, comps, report, metadata)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def canonical_keys(module: nn.Module, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name CLIP text-encoder modules ``text_model.encoder...`` as LoRA files always have.

    transformers 5 drops the ``text_model`` level of ``CLIPTextModel``; diffusers loads both
    spellings, older stacks and kohya tools only the classic one.
    """
    if module.__class__.__name__ not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        return lora
    if hasattr(module, "text_model"):
        return lora
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in lora.items()}


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
    if state.config.res_type in ("is", "ms"):
        # the one-pass merges always, for comparison; the sequential one only when chosen (costly)
        cheap = ("input", "weight", "calibrated")
        methods = [m for m in cheap if m == method or _can_merge(state, m)]
        methods += [method] if method not in cheap else []
    per_method = {}
    ref = reference_outputs(module, evals)
    for m in methods:
        lora = merged if m == method else merge_to_lora(module, m, calibration=calib, rank=rank)
        total = merged.report.fidelity if m == method else relative_error(module, lora, evals, ref)
        per_method[m] = {"total": total}
        if chains:
            per_method[m]["chains"] = {
                chain_name: relative_error(module, _subset(lora, chain.blocks), evals, ref)
                for chain_name, chain in state.chains.items()
            }
    return {
        "fidelity": merged.report.fidelity,
        "methods": per_method,
        "ranks": sorted(set(merged.report.ranks.values())),
        "truncation_max": max(merged.report.truncation.values(), default=0.0),
    }


def _can_merge(state, method: str) -> bool:
    if method == "input":
        return all(int(b.norm_count) > 0 for b in state.blocks.values())
    return True


def _subset(lora: dict, blocks) -> dict:
    keys = {f"{b.module_path}.lora_{ab}.weight" for b in blocks for ab in "AB"}
    return {k: v for k, v in lora.items() if k in keys}


def _write_kohya(path: Path, merged: dict, comps: dict, report: dict, extra: dict | None) -> None:
    unet = comps.get("unet")
    sdxl = "text_encoder_2" in comps or (
        unet is not None and unet.config.get("addition_embed_type") == "text_time"
    )
    layers = unet.config.layers_per_block if unet is not None else None
    if sdxl and unet is not None and not isinstance(layers, int):
        raise ValueError(f"kohya SDXL names need an integer layers_per_block, got {layers!r}")
    tensors = kohya_state_dict(merged, sdxl, layers)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    dim = next(v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight"))
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(float(dim)),
        "ss_base_model_version": base_model_version(unet, "text_encoder_2" in comps)
        if unet is not None
        else "sd_v1",
        "ss_v2": str(unet is not None and unet.config.get("cross_attention_dim") == 1024),
        "reslora_res_type": report["res_type"],
        "reslora_pre_num": str(report["pre_num"]),
        "reslora_merge": report["merge"],
        "reslora_fidelity": json.dumps({k: v["fidelity"] for k, v in report["components"].items()}),
    }
    meta.update(extra or {})
    save_safetensors(tensors, path, metadata=meta)


def fuse_lora(model: nn.Module, lora: dict[str, torch.Tensor]) -> nn.Module:
    """Add ``B @ A`` of a plain LoRA into the weights of a model without adapters (in place).

    The result has the base model's architecture, so it runs at exactly its cost.
    """
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in lora.items():
            if not key.endswith(".lora_A.weight"):
                continue
            path = key[: -len(".lora_A.weight")]
            if path not in modules:
                raise ValueError(f"fuse_lora: key {key!r} names no module of {type(model).__name__}")
            weight = modules[path].weight
            delta = lora[f"{path}.lora_B.weight"].to(torch.float32) @ a.to(torch.float32)
            if delta.shape != weight.shape:
                raise ValueError(
                    f"fuse_lora: key {key!r} gives shape {tuple(delta.shape)}, weight is {tuple(weight.shape)}"
                )
            weight += delta.to(weight.dtype)
    return model
