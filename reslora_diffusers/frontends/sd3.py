"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` (MMDiT) and ``StableDiffusion3Pipeline``.

Every joint block has the same shapes, so each projection role forms one unbroken chain
through all blocks (24 in SD3 medium); SD3.5's dual-attention layers (``attn2``) form chains
of their own. The last block has no ``to_add_out`` (its text stream ends there).
"""

from __future__ import annotations

import torch

from .base import register_frontend, to_model
from .dit import DiTFrontEnd, text_conditioning
from .pipelines import PipelineFamily, register_pipeline_family

#: the diffusers ``train_dreambooth_lora_sd3.py`` components: the two CLIP encoders load LoRA
#: weights; the T5 encoder ``text_encoder_3`` does not (``SD3LoraLoaderMixin``)
SD3_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class SD3Transformer(DiTFrontEnd):
    name = "sd3_transformer"
    model_class = "SD3Transformer2DModel"

    def synthetic_inputs(self, model, num=2, seed=0, batch=2, text_tokens=16):
        """N(0, 1) latents at ``sample_size`` (the noisy-latent distribution at large t),
        timesteps uniform in [0, 1000) (``sigma * 1000``), N(0, 1) text states."""
        cfg = model.config
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(num):
            kwargs = {
                "hidden_states": torch.randn(
                    batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen
                ),
                "timestep": torch.rand(batch, generator=gen) * 1000,
                **text_conditioning(model, batch, text_tokens, gen),
            }
            out.append(to_model(kwargs, model))
        return out


class SD3Pipelines(PipelineFamily):
    """``StableDiffusion3Pipeline`` and the other pipelines around an ``SD3Transformer2DModel``.

    ComfyUI maps diffusers-format ``transformer.<path>`` keys onto its MMDiT for SD3
    (``comfy/lora.py``), so the diffusers file is the one file written.
    """

    name = "stable_diffusion_3"
    denoiser = "transformer"
    denoiser_family = SD3Transformer.name
    text_encoders = SD3_TEXT_ENCODERS
    no_kohya_reason = (
        "ComfyUI and diffusers load the diffusers file (transformer.<path>.lora_A.weight keys) for SD3"
    )


SD3_TRANSFORMER = register_frontend(SD3Transformer())
SD3_PIPELINES = register_pipeline_family(SD3Pipelines())
