"""Key names of kohya-ss sd-scripts LoRA files.

SD 1.x/2.x: ``lora_unet_<diffusers module path, '.' -> '_'>``; SDXL: the original (SGM)
UNet paths ``input_blocks``/``middle_block``/``output_blocks``; text encoders ``lora_te_``
(``lora_te1_``/``lora_te2_`` for SDXL). Each module has ``.lora_down.weight`` (r x in),
``.lora_up.weight`` (out x r) and ``.alpha`` (the update is ``alpha / r * up @ down``).
"""

from __future__ import annotations

import re

import torch

_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)$")
_MID = re.compile(r"^mid_block\.attentions\.0\.(.*)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)$")


def sgm_unet_path(path: str, layers_per_block: int) -> str:
    """diffusers SDXL UNet attention path -> the SGM path kohya-ss writes for it.

    ``down_blocks.i.attentions.j`` -> ``input_blocks.{1 + i (L+1) + j}.1``,
    ``mid_block.attentions.0`` -> ``middle_block.1``,
    ``up_blocks.i.attentions.j`` -> ``output_blocks.{i (L+1) + j}.1`` (``L`` = layers per block).
    """
    if m := _DOWN.match(path):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + i * (layers_per_block + 1) + j}.1.{rest}"
    if m := _MID.match(path):
        return f"middle_block.1.{m[1]}"
    if m := _UP.match(path):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{i * (layers_per_block + 1) + j}.1.{rest}"
    raise ValueError(f"no SGM (SDXL) name for UNet module {path!r}")


def kohya_prefix(component: str, sdxl: bool) -> str:
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder":
        return "lora_te1_" if sdxl else "lora_te_"
    if component == "text_encoder_2":
        return "lora_te2_"
    raise ValueError(f"no kohya prefix for component {component!r}")


def kohya_state_dict(
    merged: dict[str, dict[str, torch.Tensor]], sdxl: bool, layers_per_block: int | None = None
) -> dict[str, torch.Tensor]:
    """Convert ``{component: plain LoRA}`` (scale baked into B) to kohya keys.

    Every module gets the same rank ``R`` (the largest; ``bs`` merges have rank ``(k+1) r``
    with ``k`` predecessors) by zero rows of ``down`` and zero columns of ``up``, which leaves
    ``up @ down`` unchanged, and ``alpha = R`` so the loaded scale is 1: community tools
    assume one network dim.
    """
    rank = max(
        a.shape[0] for lora in merged.values() for k, a in lora.items() if k.endswith(".lora_A.weight")
    )
    out = {}
    for component, lora in merged.items():
        prefix = kohya_prefix(component, sdxl)
        for key, a in lora.items():
            if not key.endswith(".lora_A.weight"):
                continue
            path = key[: -len(".lora_A.weight")]
            if sdxl and component == "unet":
                path = sgm_unet_path(path, layers_per_block)
            name = prefix + path.replace(".", "_")
            b = lora[f"{key[: -len('.lora_A.weight')]}.lora_B.weight"]
            pad = rank - a.shape[0]
            out[f"{name}.lora_down.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]) if pad else a
            out[f"{name}.lora_up.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1) if pad else b
            out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def base_model_version(unet, has_text_encoder_2: bool) -> str:
    """``ss_base_model_version`` as sd-scripts writes it."""
    if has_text_encoder_2 or unet.config.get("addition_embed_type") == "text_time":
        return "sdxl_base_v1-0"
    return "sd_v2" if unet.config.get("cross_attention_dim") == 1024 else "sd_v1"
