"""Flux: ``FluxTransformer2DModel``, ``FluxPipeline`` and their rectified-flow training
(:class:`FluxFlowMatching`).

The 19 double-stream blocks (``transformer_blocks``: joint attention with separate image and
text projections) run before the 38 single-stream blocks (``single_transformer_blocks``:
``to_q/to_k/to_v`` on the concatenated text + image tokens, then ``proj_mlp`` and ``proj_out``).
A chain is a role in execution order (``attn.to_q`` of every block), so a role present in
both kinds runs from the double into the single blocks wherever the shortcut type's shape
rule allows it: ``bs`` links on equal weight shapes, so its ``to_q/to_k/to_v`` chains run
unbroken through all 57 blocks; ``is`` and ``ms`` need equal input (``A x``) shapes, and the
single blocks see the text tokens as well, so their chains break into a double-block and a
single-block segment. :func:`~reslora_diffusers.chain_structure` shows it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from ..core import ResLoRAConfig
from ..objectives import FlowMatchingObjective
from .base import register_frontend, to_model
from .dit import DIT_ATTENTION_TARGETS, DIT_FEEDFORWARD_TARGETS, DiTFrontEnd, text_conditioning
from .pipelines import PipelineFamily, register_pipeline_family

#: the feed-forward layers of both block kinds: the double blocks' ``ff``/``ff_context`` and
#: the single blocks' ``proj_mlp``/``proj_out`` (the final ``proj_out`` is excluded, see below)
FLUX_FEEDFORWARD_TARGETS = (*DIT_FEEDFORWARD_TARGETS, "proj_mlp", "proj_out")
#: the model's output projection, which the single blocks' ``proj_out`` target also names
FLUX_OUTPUT_LAYER = "proj_out"
#: ``FluxLoraLoaderMixin`` loads LoRA weights for the CLIP encoder, not the T5 ``text_encoder_2``
FLUX_TEXT_ENCODERS = ("text_encoder",)
#: the T5 encoder, whose states are the prompt's sequence states
FLUX_T5_ENCODER = "text_encoder_2"


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """VAE latents ``(B, C, H, W)`` -> Flux tokens ``(B, H/2 * W/2, 4 C)``: each 2 x 2 patch is one
    token, its features ordered channel-major (``c, dy, dx``), tokens row-major."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs 2 x 2 latent patches: latent size {h} x {w} must be even")
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def latent_image_ids(rows: int, cols: int) -> torch.Tensor:
    """``(rows * cols, 3)`` position ids of packed tokens, row-major: ``(0, row, col)``."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(-1, 3).float()


class FluxTransformer(DiTFrontEnd):
    name = "flux_transformer"
    model_class = "FluxTransformer2DModel"

    def resolve(self, model: nn.Module, config: ResLoRAConfig) -> ResLoRAConfig:
        """The defaults, and the final ``proj_out`` left out unless ``exclude_modules`` is given:
        it is the output layer, not the single blocks' projection the target means."""
        config = super().resolve(model, config)
        if config.exclude_modules is None:
            config = replace(config, exclude_modules=[FLUX_OUTPUT_LAYER])
        return config

    def synthetic_inputs(self, model, num=2, seed=0, batch=2, text_tokens=16, grid=(8, 8)):
        """Packed N(0, 1) latents on a ``grid`` of image tokens with their ids (0, row, col),
        text ids 0, timesteps uniform in [0, 1) (``sigma``; the model scales by 1000), N(0, 1)
        text states, and guidance uniform in [1, 5) where the model embeds it."""
        cfg = model.config
        gen = torch.Generator().manual_seed(seed)
        img_ids = latent_image_ids(*grid)
        out = []
        for _ in range(num):
            kwargs = {
                "hidden_states": torch.randn(batch, grid[0] * grid[1], cfg.in_channels, generator=gen),
                "timestep": torch.rand(batch, generator=gen),
                "img_ids": img_ids,
                "txt_ids": torch.zeros(text_tokens, 3),
                **text_conditioning(model, batch, text_tokens, gen),
            }
            if cfg.guidance_embeds:
                kwargs["guidance"] = 1 + 4 * torch.rand(batch, generator=gen)
            out.append(to_model(kwargs, model))
        return out


class FluxFlowMatching(FlowMatchingObjective):
    """Flux: CLIP-L's pooled state and the T5 states, text ids 0; latents packed into 2 x 2
    patch tokens with ids ``(0, row, col)``; timesteps ``sigma``; the guidance embedding gets
    ``--guidance_scale`` (Flux dev; models without it ignore the flag)."""

    target_modules = DIT_ATTENTION_TARGETS
    clip_encoders = FLUX_TEXT_ENCODERS
    t5_encoder = FLUX_T5_ENCODER

    def latent_multiple(self) -> int:
        """2: latents are packed in 2 x 2 patches."""
        return 2

    def side_reason(self) -> str:
        return f"latents of {self.vae_scale}x smaller size are packed in 2 x 2 patches"

    def encode_text(self, models, captions, input_ids=None):
        (name,) = self.clip_encoders
        ids = self.token_ids(name, captions).to(self.device(models))
        pooled = models[name](ids, output_hidden_states=False)
        return {
            "encoder_hidden_states": self.t5_states(models, captions),
            "pooled_projections": pooled.pooler_output,
        }

    def transformer_inputs(self, noisy, timesteps, text):
        b, _, h, w = noisy.shape
        states = text["encoder_hidden_states"]
        inputs = {
            "hidden_states": pack_latents(noisy),
            "timestep": timesteps / 1000,
            "img_ids": latent_image_ids(h // 2, w // 2).to(noisy),
            "txt_ids": torch.zeros(states.shape[1], 3, device=states.device, dtype=states.dtype),
            **text,
        }
        if self.denoiser_config.guidance_embeds:
            inputs["guidance"] = torch.full((b,), self.args.guidance_scale, device=noisy.device)
        return inputs

    def layout(self, latents):
        return pack_latents(latents)


class FluxPipelines(PipelineFamily):
    """``FluxPipeline`` and the other pipelines around a ``FluxTransformer2DModel``.

    ComfyUI maps diffusers-format ``transformer.<path>`` keys onto its fused Flux layers
    (``comfy/lora.py``, ``comfy/utils.flux_to_diffusers``), so the diffusers file is the one
    file written.
    """

    name = "flux"
    title = "Flux"
    pipeline_class = "FluxPipeline"
    denoiser = "transformer"
    denoiser_family = FluxTransformer.name
    text_encoders = FLUX_TEXT_ENCODERS
    prompt_encoders = (*FLUX_TEXT_ENCODERS, FLUX_T5_ENCODER)
    shifts_latents = True
    lora_scale_kwarg = "joint_attention_kwargs"
    objective = FluxFlowMatching


FLUX_TRANSFORMER = register_frontend(FluxTransformer())
FLUX_PIPELINES = register_pipeline_family(FluxPipelines())
