"""The ComfyUI LoRA file: ``lora_comfyui.safetensors``, for the families whose diffusers-format
keys ComfyUI does not map (checked by hand with ComfyUI v0.8.0): FLUX.2, of whose modules it
maps only those named as in Flux.1, and Wan, of whose diffusers names it maps none.

Keys are ``diffusion_model.<ComfyUI module path>.lora_A.weight`` (``A``, ``r x in``) and
``.lora_B.weight`` (``B``, ``out x r``), the scale baked into ``B`` and no ``alpha`` (scale 1):
ComfyUI applies any ``diffusion_model.<path>`` key of its model's weights, and diffusers'
``load_lora_weights`` converts this layout to its own names for both families. The module paths
are the tables below (:data:`COMFYUI_RULES`, keyed by pipeline family), the inverse of diffusers'
converters ``_convert_non_diffusers_flux2_lora_to_diffusers`` and
``_convert_non_diffusers_wan_lora_to_diffusers``. Two FLUX.2 layouts differ from a renaming:

* a double block's ``to_q``, ``to_k``, ``to_v`` (and ``add_q_proj``, ``add_k_proj``,
  ``add_v_proj``) are one linear in ComfyUI, ``img_attn.qkv`` (``txt_attn.qkv``), whose output
  is q, k and v stacked. Their LoRAs are written as one, exactly: ``A = [A_q; A_k; A_v]`` (the
  ranks stacked) and ``B = diag(B_q, B_k, B_v)``, so that ``B A = [B_q A_q; B_k A_k; B_v A_v]``;
  a projection that is not adapted adds no rows to ``A`` and zero rows to ``B``;
* the final norm's projection is (scale, shift) in diffusers' ``norm_out.linear`` and (shift,
  scale) in ComfyUI's ``final_layer.adaLN_modulation.1``: the two halves of ``B``'s rows swap.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..core.keys import lora_factors, lora_paths
from ..frontends import PipelineFamily, components_family, pipeline_families, pipeline_family
from ..utils.safety import save_safetensors
from .formats import ComponentLoRAs, LoRAFormat, register_format

COMFYUI_FILE = "lora_comfyui.safetensors"
#: the key prefix of ComfyUI's diffusion model (its ``model.diffusion_model``)
COMFYUI_PREFIX = "diffusion_model."


@dataclass(frozen=True)
class Rule:
    """One diffusers module path pattern and its ComfyUI path."""

    #: a regular expression the whole diffusers module path matches
    pattern: str
    #: the ComfyUI path, ``re`` replacement syntax over the pattern's groups
    comfyui: str
    #: the projections fused into one ComfyUI linear, in the order of its output rows; the
    #: pattern's last group is one of them
    fused: tuple[str, ...] = ()
    #: the two halves of the output rows are in the other order in ComfyUI
    swap_halves: bool = False


_QKV, _ADDED_QKV = ("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")
_FLUX2 = [
    Rule(r"transformer_blocks\.(\d+)\.attn\.(to_q|to_k|to_v)", r"double_blocks.\1.img_attn.qkv", _QKV),
    Rule(
        r"transformer_blocks\.(\d+)\.attn\.(add_q_proj|add_k_proj|add_v_proj)",
        r"double_blocks.\1.txt_attn.qkv",
        _ADDED_QKV,
    ),
    Rule(r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks.\1.img_attn.proj"),
    Rule(r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks.\1.txt_attn.proj"),
    Rule(r"transformer_blocks\.(\d+)\.ff\.linear_in", r"double_blocks.\1.img_mlp.0"),
    Rule(r"transformer_blocks\.(\d+)\.ff\.linear_out", r"double_blocks.\1.img_mlp.2"),
    Rule(r"transformer_blocks\.(\d+)\.ff_context\.linear_in", r"double_blocks.\1.txt_mlp.0"),
    Rule(r"transformer_blocks\.(\d+)\.ff_context\.linear_out", r"double_blocks.\1.txt_mlp.2"),
    Rule(r"single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj", r"single_blocks.\1.linear1"),
    Rule(r"single_transformer_blocks\.(\d+)\.attn\.to_out", r"single_blocks.\1.linear2"),
    Rule(r"x_embedder", "img_in"),
    Rule(r"context_embedder", "txt_in"),
    Rule(r"time_guidance_embed\.timestep_embedder\.linear_1", "time_in.in_layer"),
    Rule(r"time_guidance_embed\.timestep_embedder\.linear_2", "time_in.out_layer"),
    Rule(r"time_guidance_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer"),
    Rule(r"time_guidance_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer"),
    Rule(
        r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear",
        r"\1.lin",
    ),
    Rule(r"proj_out", "final_layer.linear"),
    Rule(r"norm_out\.linear", "final_layer.adaLN_modulation.1", swap_halves=True),
]
_WAN = [
    Rule(r"blocks\.(\d+)\.attn1\.to_q", r"blocks.\1.self_attn.q"),
    Rule(r"blocks\.(\d+)\.attn1\.to_k", r"blocks.\1.self_attn.k"),
    Rule(r"blocks\.(\d+)\.attn1\.to_v", r"blocks.\1.self_attn.v"),
    Rule(r"blocks\.(\d+)\.attn1\.to_out\.0", r"blocks.\1.self_attn.o"),
    Rule(r"blocks\.(\d+)\.attn2\.to_q", r"blocks.\1.cross_attn.q"),
    Rule(r"blocks\.(\d+)\.attn2\.to_k", r"blocks.\1.cross_attn.k"),
    Rule(r"blocks\.(\d+)\.attn2\.to_v", r"blocks.\1.cross_attn.v"),
    Rule(r"blocks\.(\d+)\.attn2\.to_out\.0", r"blocks.\1.cross_attn.o"),
    Rule(r"blocks\.(\d+)\.attn2\.add_k_proj", r"blocks.\1.cross_attn.k_img"),
    Rule(r"blocks\.(\d+)\.attn2\.add_v_proj", r"blocks.\1.cross_attn.v_img"),
    Rule(r"blocks\.(\d+)\.ffn\.net\.0\.proj", r"blocks.\1.ffn.0"),
    Rule(r"blocks\.(\d+)\.ffn\.net\.2", r"blocks.\1.ffn.2"),
    Rule(r"condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
    Rule(r"condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
    Rule(r"condition_embedder\.time_proj", "time_projection.1"),
    Rule(r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
    Rule(r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
    Rule(r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", "img_emb.proj.1"),
    Rule(r"condition_embedder\.image_embedder\.ff\.net\.2", "img_emb.proj.3"),
    Rule(r"proj_out", "head.head"),
]
#: per pipeline family that has ComfyUI files: its denoiser's module paths in ComfyUI's model
COMFYUI_RULES: dict[str, list[Rule]] = {"flux2": _FLUX2, "wan": _WAN}


@dataclass(frozen=True)
class Placement:
    """Where one diffusers module goes in the ComfyUI file."""

    comfyui: str
    rule: Rule
    #: the fused projections' diffusers paths, in output order (empty: the module alone)
    fused_paths: tuple[str, ...] = ()


def placement(family: str, path: str) -> Placement:
    """Where the diffusers module ``path`` of ``family``'s denoiser goes (``ValueError`` naming
    it when no rule does)."""
    for rule in COMFYUI_RULES[family]:
        m = re.fullmatch(rule.pattern, path)
        if m is None:
            continue
        comfy = m.expand(rule.comfyui)
        if not rule.fused:
            return Placement(comfy, rule)
        start, end = m.span(m.lastindex)
        return Placement(comfy, rule, tuple(path[:start] + name + path[end:] for name in rule.fused))
    raise ValueError(f"no ComfyUI name for {family} module {path!r} (known: {_patterns(family)})")


def _patterns(family: str) -> str:
    return ", ".join(rule.pattern.replace("\\", "") for rule in COMFYUI_RULES[family])


def comfyui_state_dict(
    family: str, model: nn.Module, lora: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{diffusion_model.<ComfyUI path>.lora_A/B.weight: tensor}`` of the denoiser ``model``'s
    plain ``lora`` (diffusers module paths, scale in ``B``): renamed, fused and swapped as the
    module doc says."""
    groups: dict[str, list[tuple[Placement, str]]] = {}
    for path in lora_paths(lora):
        where = placement(family, path)
        groups.setdefault(where.comfyui, []).append((where, path))
    modules = dict(model.named_modules())
    out = {}
    for comfy, members in groups.items():
        where = members[0][0]
        if where.fused_paths:
            a, b = _fused(where.fused_paths, {p for _, p in members}, lora, modules)
        else:
            a, b = lora_factors(lora, members[0][1])
            if where.rule.swap_halves:
                b = torch.cat(b.chunk(2, dim=0)[::-1])
        out[f"{COMFYUI_PREFIX}{comfy}.lora_A.weight"] = a.detach().cpu().contiguous()
        out[f"{COMFYUI_PREFIX}{comfy}.lora_B.weight"] = b.detach().cpu().contiguous()
    return out


def _fused(
    paths: tuple[str, ...], adapted: set[str], lora: dict, modules: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = [A_i]`` stacked and ``B = diag(B_i)`` over the fused projections ``paths`` (an
    unadapted one: no rows of ``A``, zero rows of ``B`` of its output size)."""
    a_parts, b_parts = [], []
    for path in paths:
        if path in adapted:
            a, b = lora_factors(lora, path)
        else:
            weight = modules[path].weight
            a, b = weight.new_zeros(0, weight.shape[1]), weight.new_zeros(weight.shape[0], 0)
        a_parts.append(a)
        b_parts.append(b.to(a_parts[0].dtype))
    return torch.cat(a_parts), torch.block_diag(*b_parts)


def comfyui_paths(family: str, model: nn.Module) -> dict[str, list[str]]:
    """``{ComfyUI path: [the diffusers paths it holds]}`` for every linear layer of ``model``
    that a rule of ``family`` names (fused ones in output order)."""
    out: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        try:
            where = placement(family, path)
        except ValueError:
            continue
        out[where.comfyui] = list(where.fused_paths) or [path]
    return out


def _comfyui_keys(keys: Iterable[str]) -> list[str]:
    return [k for k in keys if k.startswith(COMFYUI_PREFIX) and (".lora_A." in k or ".lora_B." in k)]


def _families() -> list[PipelineFamily]:
    return [f for f in pipeline_families() if f.name in COMFYUI_RULES]


class ComfyUIFormat(LoRAFormat):
    name = "comfyui"
    file_name = COMFYUI_FILE
    description = "ComfyUI keys (diffusion_model.<ComfyUI path>)"
    key_names = "diffusion_model.*.lora_A/lora_B"

    def applies_to(self, family):
        return family.name in COMFYUI_RULES

    def refusal(self, family):
        return (
            f"no ComfyUI-layout file for {family.name} pipelines: ComfyUI maps their diffusers-format keys "
            "(load pytorch_lora_weights.safetensors)"
        )

    def write(self, path: Path, loras: ComponentLoRAs, components, report, metadata=None) -> None:
        family = components_family(components)
        tensors = comfyui_state_dict(family.name, components[family.denoiser], loras[family.denoiser])
        meta = {
            "format": "pt",
            "reslora_base_family": family.name,
            "reslora_res_type": report["res_type"],
            "reslora_pre_num": str(report["pre_num"]),
            "reslora_merge": report["merge"],
            "reslora_output_error": json.dumps(
                {k: v["output_error"] for k, v in report["components"].items()}
            ),
            **(metadata or {}),
        }
        save_safetensors(tensors, path, metadata=meta)

    def owns(self, keys):
        return bool(_comfyui_keys(keys))

    def components(self, keys):
        """The denoiser of the families with ComfyUI files (ComfyUI's diffusion model)."""
        return {f.denoiser for f in _families()} if _comfyui_keys(keys) else set()

    def check(self, pipe, filename, shapes):
        """Every key must name a module of the pipeline's denoiser in ComfyUI's layout, ``A``
        with its input width and ``B`` with its output rows (the fused ones' summed)."""
        family = pipeline_family(pipe)
        if family.name not in COMFYUI_RULES:
            raise ValueError(f"{filename}: a ComfyUI-layout file; {self.refusal(family)}")
        denoiser = getattr(pipe, family.denoiser)
        known = comfyui_paths(family.name, denoiser)
        modules = dict(denoiser.named_modules())
        for key in sorted(_comfyui_keys(shapes)):
            comfy = key.removeprefix(COMFYUI_PREFIX).rsplit(".lora_", 1)[0]
            if comfy not in known:
                raise ValueError(
                    f"{filename}: key {key!r} names no linear layer of this {family.name} pipeline's "
                    f"{family.denoiser} (LoRA for another base?)"
                )
            weights = [modules[p].weight for p in known[comfy]]
            shape = shapes[key]
            fits = len(shape) == 2 and (
                shape[1] == weights[0].shape[1]
                if ".lora_A." in key
                else shape[0] == sum(w.shape[0] for w in weights)
            )
            if not fits:
                raise ValueError(
                    f"{filename}: key {key!r} has shape {shape}, which does not fit the base layer "
                    f"{tuple(weights[0].shape)}"
                    + (f" (x{len(weights)} fused)" if len(weights) > 1 else "")
                    + " (LoRA for another base model?)"
                )


COMFYUI = register_format(ComfyUIFormat())
