"""Stable Diffusion pipelines (SD 1.x/2.x, SDXL): their components and kohya-ss names.

This is the one place that names their components: the denoiser ``unet`` and the text
encoders ``text_encoder`` (and SDXL's ``text_encoder_2``). Each component is a model of its
own family (:mod:`.sd_unet`, :mod:`.clip_text`); the generic pipeline functions are in
:mod:`.pipelines`.
"""

from __future__ import annotations

import torch.nn as nn

from .pipelines import PipelineFamily, register_pipeline_family
from .sd_unet import SD_UNET, is_sdxl_unet

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


def kohya_component(key: str) -> str | None:
    """The pipeline component a kohya-ss key is for (``lora_unet_...`` -> ``unet``,
    ``lora_te2_...`` -> ``text_encoder_2``), or None for a key of no known prefix."""
    return next(
        (
            component
            for layout in _KOHYA_PREFIXES.values()
            for component, prefix in layout.items()
            if key.startswith(f"{prefix}_")
        ),
        None,
    )


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


class SDPipelines(PipelineFamily):
    """``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` and every pipeline with a ``unet``."""

    name = "stable_diffusion"
    priority = 10
    denoiser = DENOISER
    denoiser_family = SD_UNET.name
    text_encoders = TEXT_ENCODERS
    formats = ("diffusers", "kohya")

    def kohya_layout(self, components):
        return kohya_layout(components)

    def kohya_prefix(self, component, layout):
        return kohya_prefix(component, layout)

    def kohya_metadata(self, components, layout):
        return kohya_metadata(components, layout)


SD_PIPELINES = register_pipeline_family(SDPipelines())
