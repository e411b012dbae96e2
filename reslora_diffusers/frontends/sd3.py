"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` (MMDiT), ``StableDiffusion3Pipeline``
and their rectified-flow training (:class:`SD3FlowMatching`).

Every joint block has the same shapes, so each projection role forms one unbroken chain
through all blocks (24 in SD3 medium); SD3.5's dual-attention layers (``attn2``) form chains
of their own. The last block has no ``to_add_out`` (its text stream ends there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..objectives import FlowMatchingObjective
from .base import register_frontend, to_model
from .dit import DIT_ATTENTION_TARGETS, DiTFrontEnd, text_conditioning
from .pipelines import PipelineFamily, register_pipeline_family

#: the diffusers ``train_dreambooth_lora_sd3.py`` components: the two CLIP encoders load LoRA
#: weights; the T5 encoder ``text_encoder_3`` does not (``SD3LoraLoaderMixin``)
SD3_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
#: the T5 encoder, whose states follow the CLIP states in the prompt's encoding
SD3_T5_ENCODER = "text_encoder_3"


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


class SD3FlowMatching(FlowMatchingObjective):
    """SD3 / SD3.5: CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width
    and followed by the T5 states; the pooled state is both CLIPs' projections side by side;
    the transformer takes timesteps ``1000 sigma``."""

    target_modules = DIT_ATTENTION_TARGETS
    unused_flags = (*FlowMatchingObjective.unused_flags, "guidance_scale")
    default_weighting = "logit_normal"
    clip_encoders = SD3_TEXT_ENCODERS
    t5_encoder = SD3_T5_ENCODER

    def latent_multiple(self) -> int:
        """The transformer's patch size."""
        return self.denoiser_config.patch_size

    def side_reason(self) -> str:
        return f"the VAE's factor {self.vae_scale} x the transformer's patch size {self.latent_multiple()}"

    def max_side(self) -> int:
        """``pos_embed_max_size`` patches (SD3 crops its position embedding to the image)."""
        return self.denoiser_config.pos_embed_max_size * self.side_step

    def encode_text(self, models, captions, input_ids=None):
        device = self.device(models)
        states, pooled = [], []
        for name in self.clip_encoders:
            out = models[name](self.token_ids(name, captions).to(device), output_hidden_states=True)
            pooled.append(out[0])
            states.append(out.hidden_states[-2])
        clip = torch.cat(states, dim=-1)
        t5 = self.t5_states(models, captions)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5], dim=-2),
            "pooled_projections": torch.cat(pooled, dim=-1),
        }

    def transformer_inputs(self, noisy, timesteps, text):
        return {"hidden_states": noisy, "timestep": timesteps, **text}


class SD3Pipelines(PipelineFamily):
    """``StableDiffusion3Pipeline`` and the other pipelines around an ``SD3Transformer2DModel``.

    ComfyUI maps diffusers-format ``transformer.<path>`` keys onto its MMDiT for SD3
    (``comfy/lora.py``), so the diffusers file is the one file written.
    """

    name = "stable_diffusion_3"
    title = "SD3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser = "transformer"
    denoiser_family = SD3Transformer.name
    text_encoders = SD3_TEXT_ENCODERS
    prompt_encoders = (*SD3_TEXT_ENCODERS, SD3_T5_ENCODER)
    shifts_latents = True
    lora_scale_kwarg = "joint_attention_kwargs"
    objective = SD3FlowMatching


SD3_TRANSFORMER = register_frontend(SD3Transformer())
SD3_PIPELINES = register_pipeline_family(SD3Pipelines())
