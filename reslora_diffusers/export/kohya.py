"""kohya-ss sd-scripts LoRA files.

Keys are ``<prefix>_<module name>.lora_down.weight`` (``A``, ``r x in`` or ``r x in x kh x kw``),
``.lora_up.weight`` (``B``, ``out x r`` or ``out x r x 1 x 1``) and ``.alpha`` (the update is
``alpha / r * up @ down``). The prefix per component and the module names come from the
model families (:mod:`reslora_diffusers.frontends`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..core.keys import lora_factors, lora_paths
from ..frontends import components_family, frontend_for
from ..utils.safety import save_safetensors

KOHYA_FILE = "lora_kohya.safetensors"


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of ``down`` and zero columns of ``up`` up to ``rank``: ``up @ down`` is unchanged."""
    pad = rank - a.shape[0]
    if not pad:
        return a, b
    a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])])
    b = torch.cat([b, b.new_zeros(b.shape[0], pad, *b.shape[2:])], dim=1)
    return a, b


def kohya_state_dict(
    merged: dict[str, dict[str, torch.Tensor]], components: dict[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """Convert ``{component: plain LoRA}`` (scale baked into B) to kohya keys.

    Every module gets the same rank ``R`` (the largest; ``bs`` merges have rank ``(k+1) r``
    with ``k`` predecessors) by zero padding, and ``alpha = R`` so the loaded scale is 1:
    community tools assume one network dim.
    """
    pipeline = components_family(components)
    layout = pipeline.kohya_layout(components)
    rank = max(lora_factors(lora, p)[0].shape[0] for lora in merged.values() for p in lora_paths(lora))
    out = {}
    for component, lora in merged.items():
        module = components[component]
        family = frontend_for(module)
        prefix = pipeline.kohya_prefix(component, layout)
        for path in lora_paths(lora):
            name = f"{prefix}_{family.kohya_name(module, path, layout)}"
            a, b = _pad_rank(*lora_factors(lora, path), rank)
            out[f"{name}.lora_down.weight"] = a.detach().cpu().contiguous()
            out[f"{name}.lora_up.weight"] = b.detach().cpu().contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def write_kohya(
    path: Path,
    merged: dict[str, dict[str, torch.Tensor]],
    components: dict[str, nn.Module],
    report: dict,
    extra: dict[str, str] | None = None,
) -> None:
    """Write the kohya file with ``ss_*`` metadata and ``reslora_*`` provenance."""
    tensors = kohya_state_dict(merged, components)
    pipeline = components_family(components)
    dim = next(v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight"))
    convs = any(v.ndim == 4 for k, v in tensors.items() if k.endswith("lora_down.weight"))
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(float(dim)),
        **pipeline.kohya_metadata(components, pipeline.kohya_layout(components)),
        "reslora_res_type": report["res_type"],
        "reslora_pre_num": str(report["pre_num"]),
        "reslora_merge": report["merge"],
        "reslora_output_error": json.dumps({k: v["output_error"] for k, v in report["components"].items()}),
    }
    if convs:  # sd-scripts' LoCon metadata: convolutions at the same dim and alpha
        meta["ss_network_args"] = json.dumps({"conv_dim": str(dim), "conv_alpha": str(float(dim))})
    meta.update(extra or {})
    save_safetensors(tensors, path, metadata=meta)
