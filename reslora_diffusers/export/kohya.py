"""kohya-ss sd-scripts LoRA files, and their key names per pipeline family.

Keys are ``<prefix>_<module name>.lora_down.weight`` (``A``, ``r x in`` or ``r x in x kh x kw``),
``.lora_up.weight`` (``B``, ``out x r`` or ``out x r x 1 x 1``) and ``.alpha`` (the update is
``alpha / r * up @ down``). The module name is the module's path in the file's spelling
(:meth:`~reslora_diffusers.frontends.FrontEnd.file_path`) with ``_`` for ``.``; SDXL's UNet
is spelled in the original (SGM) layout, as sd-scripts writes it. The tables below are the
one place that names kohya prefixes and layouts, keyed by pipeline family
(:mod:`reslora_diffusers.frontends`); the format (:class:`KohyaFormat`) applies to the families
they have. diffusers' ``load_lora_weights`` reads the file (its kohya converter).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from ..core.keys import lora_factors, lora_paths
from ..frontends import PipelineFamily, components_family
from ..utils.safety import save_safetensors
from .formats import ComponentLoRAs, LoRAFormat, register_format

KOHYA_FILE = "lora_kohya.safetensors"

#: the key prefix of each component, per pipeline family that has kohya-ss files
KOHYA_PREFIXES: dict[str, dict[str, str]] = {
    "stable_diffusion": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "stable_diffusion_xl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
#: why a family has no kohya-ss file (for the error when one is asked for)
NO_KOHYA = {
    "stable_diffusion_3": "ComfyUI and diffusers load the diffusers file (transformer.<path>.lora_A.weight keys) for SD3",
    "flux": "ComfyUI and diffusers load the diffusers file (transformer.<path>.lora_A.weight keys) for Flux",
}
#: every kohya key prefix (with the trailing ``_``)
KEY_PREFIXES = tuple(sorted({f"{p}_" for table in KOHYA_PREFIXES.values() for p in table.values()}))

_RESNET_SGM = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
    "time_emb_proj": "emb_layers.1",
}
_DOWN = re.compile(r"^down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)$")
_DOWN_SAMPLER = re.compile(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv$")
_MID = re.compile(r"^mid_block\.(attentions|resnets)\.(\d+)\.(.*)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)$")
_UP_SAMPLER = re.compile(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv$")


def _sgm_inner(kind: str, rest: str) -> str:
    """``1.<rest>`` for an attention, ``0.<SGM resnet layer>`` for a resnet."""
    if kind == "attentions":
        return f"1.{rest}"
    if rest not in _RESNET_SGM:
        raise ValueError(f"no SGM (SDXL) name for resnet layer {rest!r}")
    return f"0.{_RESNET_SGM[rest]}"


def sgm_unet_path(path: str, unet: nn.Module) -> str:
    """diffusers SDXL UNet path -> the SGM path kohya-ss writes for it (``L`` = layers per block).

    ``down_blocks.i.{attentions,resnets}.j`` -> ``input_blocks.{1 + i (L+1) + j}.{1,0}``,
    ``down_blocks.i.downsamplers.0.conv`` -> ``input_blocks.{(i+1)(L+1)}.0.op``,
    ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1`` -> ``middle_block.0`` / ``.1`` / ``.2``,
    ``up_blocks.i.{attentions,resnets}.j`` -> ``output_blocks.{i (L+1) + j}.{1,0}``,
    ``up_blocks.i.upsamplers.0.conv`` -> ``output_blocks.{i (L+1) + L}.{2 with attention, else 1}.conv``;
    resnet layers ``conv1``/``conv2``/``conv_shortcut``/``time_emb_proj`` -> ``in_layers.2``/
    ``out_layers.3``/``skip_connection``/``emb_layers.1``.
    """
    per = unet.config.layers_per_block
    if not isinstance(per, int):
        raise ValueError(f"kohya SDXL names need an integer layers_per_block, got {per!r}")
    if m := _DOWN.match(path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + i * (per + 1) + j}.{_sgm_inner(kind, rest)}"
    if m := _DOWN_SAMPLER.match(path):
        return f"input_blocks.{(int(m[1]) + 1) * (per + 1)}.0.op"
    if m := _MID.match(path):
        kind, j, rest = m[1], int(m[2]), m[3]
        index = 1 if kind == "attentions" else 2 * j
        return f"middle_block.{index}.{_sgm_inner(kind, rest).split('.', 1)[1]}"
    if m := _UP.match(path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{i * (per + 1) + j}.{_sgm_inner(kind, rest)}"
    if m := _UP_SAMPLER.match(path):
        i = int(m[1])
        inner = 2 if hasattr(unet.up_blocks[i], "attentions") else 1
        return f"output_blocks.{i * (per + 1) + per}.{inner}.conv"
    raise ValueError(f"no SGM (SDXL) name for UNet module {path!r}")


#: the module paths of a family's denoiser as sd-scripts spells them, where not diffusers' own
_DENOISER_PATHS = {"stable_diffusion_xl": sgm_unet_path}


def no_kohya_reason(family: PipelineFamily) -> str:
    """The error for a kohya-ss file asked of a family that has none."""
    why = NO_KOHYA.get(family.name, f"kohya-ss names are known for {', '.join(KOHYA_PREFIXES)} pipelines")
    return f"no kohya-ss file for {family.name} pipelines: {why}"


def kohya_component(key: str) -> str | None:
    """The pipeline component a kohya-ss key is for (``lora_unet_...`` -> ``unet``,
    ``lora_te2_...`` -> ``text_encoder_2``), or None for a key of no known prefix."""
    return next(
        (
            component
            for table in KOHYA_PREFIXES.values()
            for component, prefix in table.items()
            if key.startswith(f"{prefix}_")
        ),
        None,
    )


def kohya_name(family: PipelineFamily, component: str, module: nn.Module, path: str) -> str:
    """``<prefix>_<module name>`` of ``path`` (the module's path as LoRA files spell it) in
    ``component`` (``module``, a model of ``family``'s pipelines)."""
    prefixes = KOHYA_PREFIXES[family.name]
    if component not in prefixes:
        raise ValueError(f"no kohya prefix for component {component!r} of a {family.name} pipeline")
    spelled = _DENOISER_PATHS.get(family.name) if component == family.denoiser else None
    name = spelled(path, module) if spelled else path
    return f"{prefixes[component]}_{name.replace('.', '_')}"


def base_model_metadata(family: PipelineFamily, components: dict[str, nn.Module]) -> dict[str, str]:
    """``ss_base_model_version`` and ``ss_v2`` as sd-scripts writes them (SD 2.x: 1024-wide text)."""
    unet = components.get(family.denoiser)
    v2 = unet is not None and unet.config.get("cross_attention_dim") == 1024
    if family.name == "stable_diffusion_xl":
        version = "sdxl_base_v1-0"
    else:
        version = "sd_v2" if v2 else "sd_v1"
    return {"ss_base_model_version": version, "ss_v2": str(v2)}


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of ``down`` and zero columns of ``up`` up to ``rank``: ``up @ down`` is unchanged."""
    pad = rank - a.shape[0]
    if not pad:
        return a, b
    a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])])
    b = torch.cat([b, b.new_zeros(b.shape[0], pad, *b.shape[2:])], dim=1)
    return a, b


def kohya_state_dict(merged: ComponentLoRAs, components: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Convert ``{component: plain LoRA}`` (scale baked into B, module paths as files spell
    them) to kohya keys.

    Every module gets the same rank ``R`` (the largest; ``bs`` merges have rank ``(k+1) r``
    with ``k`` predecessors) by zero padding, and ``alpha = R`` so the loaded scale is 1:
    community tools assume one network dim.
    """
    family = components_family(components)
    if family.name not in KOHYA_PREFIXES:
        raise ValueError(no_kohya_reason(family))
    rank = max(lora_factors(lora, p)[0].shape[0] for lora in merged.values() for p in lora_paths(lora))
    out = {}
    for component, lora in merged.items():
        for path in lora_paths(lora):
            name = kohya_name(family, component, components[component], path)
            a, b = _pad_rank(*lora_factors(lora, path), rank)
            out[f"{name}.lora_down.weight"] = a.detach().cpu().contiguous()
            out[f"{name}.lora_up.weight"] = b.detach().cpu().contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def write_kohya(
    path: Path,
    merged: ComponentLoRAs,
    components: dict[str, nn.Module],
    report: dict,
    extra: dict[str, str] | None = None,
) -> None:
    """Write the kohya file with ``ss_*`` metadata and ``reslora_*`` provenance."""
    tensors = kohya_state_dict(merged, components)
    dim = next(v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight"))
    convs = any(v.ndim == 4 for k, v in tensors.items() if k.endswith("lora_down.weight"))
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(float(dim)),
        **base_model_metadata(components_family(components), components),
        "reslora_res_type": report["res_type"],
        "reslora_pre_num": str(report["pre_num"]),
        "reslora_merge": report["merge"],
        "reslora_output_error": json.dumps({k: v["output_error"] for k, v in report["components"].items()}),
    }
    if convs:  # sd-scripts' LoCon metadata: convolutions at the same dim and alpha
        meta["ss_network_args"] = json.dumps({"conv_dim": str(dim), "conv_alpha": str(float(dim))})
    meta.update(extra or {})
    save_safetensors(tensors, path, metadata=meta)


def _kohya_keys(keys) -> list[str]:
    return [k for k in keys if k.startswith(KEY_PREFIXES) and ".lora_down." in k]


class KohyaFormat(LoRAFormat):
    name = "kohya"
    file_name = KOHYA_FILE
    description = "kohya-ss keys"
    key_names = "lora_down/lora_up"

    def applies_to(self, family):
        return family.name in KOHYA_PREFIXES

    def refusal(self, family):
        return no_kohya_reason(family)

    def write(self, path, loras, components, report, metadata=None):
        write_kohya(path, loras, components, report, metadata)

    def owns(self, keys):
        return bool(_kohya_keys(keys))

    def components(self, keys):
        return {kohya_component(k) for k in _kohya_keys(keys)}

    def check(self, pipe, filename, shapes):
        """Its keys must be for components the pipeline has (diffusers' converter checks their
        layers on load)."""
        for key in sorted(_kohya_keys(shapes)):
            component = kohya_component(key)
            if getattr(pipe, component, None) is None:
                raise ValueError(
                    f"{filename}: kohya key {key!r} is for component {component!r}, which this pipeline lacks"
                )


KOHYA = register_format(KohyaFormat())
