"""Stable Diffusion pipelines (SD 1.x/2.x, SDXL): which components carry ResLoRA, and the
names their LoRA files give them.

This is the one place that names the components: the denoiser ``unet`` and the text
encoders ``text_encoder`` (and SDXL's ``text_encoder_2``). Each component is a model of its
own family (:mod:`.sd_unet`, :mod:`.clip_text`).
"""

from __future__ import annotations

from dataclasses import replace

import torch.nn as nn

from ..core import ResLoRAConfig, has_reslora
from .base import frontend_for, is_instance
from .sd_unet import is_sdxl_unet

DENOISER = "unet"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = (DENOISER, *TEXT_ENCODERS)

#: kohya-ss prefixes per layout: SD 1.x/2.x and SDXL (two text encoders)
_KOHYA_PREFIXES = {
    "sd": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}

#: every kohya key prefix of these pipelines (with the trailing ``_``)
KOHYA_PREFIXES = tuple(sorted({f"{p}_" for layout in _KOHYA_PREFIXES.values() for p in layout.values()}))


def is_pipeline(obj) -> bool:
    return is_instance(obj, "diffusers", ("DiffusionPipeline",))


def pipeline_components(pipe, train_text_encoder: bool = True) -> dict[str, nn.Module]:
    """``{"unet": ..., "text_encoder": ..., "text_encoder_2": ...}`` of a pipeline (those present)."""
    names = COMPONENTS if train_text_encoder else (DENOISER,)
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def reslora_components(pipe) -> dict[str, nn.Module]:
    """The pipeline's components that carry ResLoRA."""
    return {k: v for k, v in pipeline_components(pipe).items() if has_reslora(v)}


def add_reslora_to_pipeline(pipe, config: ResLoRAConfig, train_text_encoder: bool = False):
    """ResLoRA on the pipeline's UNet and, with ``train_text_encoder``, on its text encoder(s).

    ``config.target_modules`` applies to the UNet; text encoders use their family's preset.
    """
    for name, module in pipeline_components(pipe, train_text_encoder).items():
        component_config = config if name == DENOISER else replace(config, target_modules=None)
        frontend_for(module).attach(module, component_config)
    return pipe


def remove_reslora_from_pipeline(pipe):
    for module in reslora_components(pipe).values():
        frontend_for(module).detach(module)
    return pipe


def kohya_layout(components: dict[str, nn.Module]) -> str:
    """``sdxl`` when the components are SDXL's (second text encoder or text_time UNet), else ``sd``."""
    unet = components.get(DENOISER)
    sdxl = "text_encoder_2" in components or (unet is not None and is_sdxl_unet(unet))
    return "sdxl" if sdxl else "sd"


def kohya_prefix(component: str, layout: str) -> str:
    prefixes = _KOHYA_PREFIXES[layout]
    if component not in prefixes:
        raise ValueError(f"no kohya prefix for component {component!r} of a {layout} pipeline")
    return prefixes[component]


def kohya_metadata(components: dict[str, nn.Module], layout: str) -> dict[str, str]:
    """``ss_base_model_version`` and ``ss_v2`` as sd-scripts writes them."""
    unet = components.get(DENOISER)
    v2 = unet is not None and unet.config.get("cross_attention_dim") == 1024
    if layout == "sdxl":
        version = "sdxl_base_v1-0"
    else:
        version = "sd_v2" if v2 else "sd_v1"
    return {"ss_base_model_version": version, "ss_v2": str(v2)}
