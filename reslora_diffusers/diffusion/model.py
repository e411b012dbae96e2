"""ResLoRA on diffusers models: UNets through :class:`ResLoRAAttnProcessor`, CLIP text
encoders through the core, and whole Stable Diffusion (XL) pipelines."""

from __future__ import annotations

from dataclasses import replace

import torch.nn as nn

from ..core import model as core
from ..core.config import ResLoRAConfig
from .processor import ResLoRAAttnProcessor

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
#: The transformer blocks' feed-forward layers (GEGLU input projection, output projection),
#: which kohya-ss's LoRA trains by default too. They are ordinary linear layers for the core;
#: only the attention projections go through :class:`ResLoRAAttnProcessor`.
UNET_FEEDFORWARD_TARGETS = ["ff.net.0.proj", "ff.net.2"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def add_reslora_to_unet(unet: nn.Module, config: ResLoRAConfig) -> nn.Module:
    """Wrap the UNet's attention projections and install :class:`ResLoRAAttnProcessor`.

    The original processors are kept and put back by :func:`remove_reslora_from_unet`.
    """
    if config.target_modules is None:
        config = replace(config, target_modules=list(UNET_TARGETS))
    original = unet.attn_processors
    core.add_reslora(unet, config)
    core.get_state(unet).extras["attn_processors"] = original
    unet.set_attn_processor(ResLoRAAttnProcessor())
    return unet


def remove_reslora_from_unet(unet: nn.Module) -> nn.Module:
    original = core.get_state(unet).extras["attn_processors"]
    core.remove_reslora(unet)
    unet.set_attn_processor(original)
    return unet


def add_reslora_to_text_encoder(text_encoder: nn.Module, config: ResLoRAConfig) -> nn.Module:
    """ResLoRA on a CLIP text encoder's ``q_proj``/``k_proj``/``v_proj``/``out_proj`` (default)."""
    if config.target_modules is None:
        config = replace(config, target_modules=list(TEXT_ENCODER_TARGETS))
    return core.add_reslora(text_encoder, config)


def pipeline_components(pipe, train_text_encoder: bool = True) -> dict[str, nn.Module]:
    """``{"unet": ..., "text_encoder": ..., "text_encoder_2": ...}`` of a pipeline (those present)."""
    comps = {"unet": pipe.unet}
    if train_text_encoder:
        for name in TEXT_ENCODERS:
            module = getattr(pipe, name, None)
            if module is not None:
                comps[name] = module
    return comps


def add_reslora_to_pipeline(pipe, config: ResLoRAConfig, train_text_encoder: bool = False):
    """ResLoRA on the pipeline's UNet and, with ``train_text_encoder``, on its text encoder(s).

    ``config.target_modules`` applies to the UNet; text encoders use their CLIP preset.
    """
    add_reslora_to_unet(pipe.unet, config)
    if train_text_encoder:
        te_config = replace(config, target_modules=None)
        for name in TEXT_ENCODERS:
            module = getattr(pipe, name, None)
            if module is not None:
                add_reslora_to_text_encoder(module, te_config)
    return pipe


def remove_reslora_from_pipeline(pipe):
    remove_reslora_from_unet(pipe.unet)
    for name in TEXT_ENCODERS:
        module = getattr(pipe, name, None)
        if module is not None and core.has_reslora(module):
            core.remove_reslora(module)
    return pipe


def reslora_components(pipe) -> dict[str, nn.Module]:
    """The pipeline's components that carry ResLoRA."""
    return {k: v for k, v in pipeline_components(pipe).items() if core.has_reslora(v)}
