"""SDXL: its ``UNet2DConditionModel`` with time and pooled-text conditioning, and its pipelines.

Everything SDXL adds to Stable Diffusion (:mod:`.sd`) is here: the UNet's added conditioning
(``text_embeds``, ``time_ids``), the second text encoder, and the prompt encoding and
conditioning of its training objective, as diffusers' ``train_text_to_image_lora_sdxl.py`` and
``StableDiffusionXLPipeline.encode_prompt`` have them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import register_frontend
from .pipelines import register_pipeline_family
from .sd import SDDenoising, SDPipelines, SDUNet


def is_sdxl_unet(unet: nn.Module) -> bool:
    """SDXL's UNet: time and pooled-text conditioning (``addition_embed_type="text_time"``)."""
    return unet.config.get("addition_embed_type") == "text_time"


class SDXLUNet(SDUNet):
    """An SDXL UNet (``addition_embed_type="text_time"``): synthetic inputs carry its added conditioning."""

    name = "sdxl_unet"
    #: before the Stable Diffusion UNet family, of which it is a special case
    priority = 25

    def matches(self, model):
        return super().matches(model) and is_sdxl_unet(model)

    def added_conditioning(self, model, batch, size, gen):
        """N(0, 1) pooled text states and time ids uniform in [0, 8 x sample size) (pixels)."""
        cfg = model.config
        n_time = 6 * cfg.addition_time_embed_dim
        return {
            "added_cond_kwargs": {
                "text_embeds": torch.randn(
                    batch, cfg.projection_class_embeddings_input_dim - n_time, generator=gen
                ),
                "time_ids": torch.rand(batch, 6, generator=gen) * size * 8,
            }
        }


class SDXLDenoising(SDDenoising):
    """SDXL UNets: DDPM conditioned as diffusers' SDXL LoRA script and ``encode_prompt`` do. The
    text states are both CLIP encoders' penultimate hidden states side by side (768 + 1280 =
    2048 features in SDXL base), ``text_embeds`` the second encoder's pooled projection, and
    ``time_ids`` six numbers per image, ``original_size + crop_top_left + target_size`` (each
    height first), from the batch's ``original_sizes``, ``crop_top_lefts`` and ``target_sizes``:
    the image's own size before any resize, where the crop starts in the resized image, and the
    size trained at (:mod:`reslora_diffusers.training.data`)."""

    @property
    def tokenizer(self):
        """None: each encoder's ids come from its own tokenizer (:meth:`encode_text`)."""
        return None

    def encode_text(self, models, captions, input_ids=None):
        """``encoder_hidden_states`` (both penultimate states) and ``text_embeds`` (the pooled
        projection of the second encoder)."""
        device = self.device(models)
        states = []
        for name in self.text_encoder_names:
            out = models[name](self.token_ids(name, captions).to(device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(states, dim=-1), "text_embeds": out[0]}

    def unet_conditioning(self, text, batch):
        pooled = text["text_embeds"]
        time_ids = torch.tensor(
            [
                [*original, *crop, *target]
                for original, crop, target in zip(
                    batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"]
                )
            ],
            dtype=pooled.dtype,
            device=pooled.device,
        )
        return {
            "encoder_hidden_states": text["encoder_hidden_states"],
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
        }


class SDXLPipelines(SDPipelines):
    """``StableDiffusionXLPipeline`` and every pipeline around an SDXL UNet."""

    name = "stable_diffusion_xl"
    title = "SDXL"
    #: after Stable Diffusion, before the diffusion transformers: two CLIP encoders alone are SDXL's
    priority = 5
    pipeline_class = "StableDiffusionXLPipeline"
    denoiser_family = SDXLUNet.name
    text_encoders = ("text_encoder", "text_encoder_2")
    prompt_encoders = ("text_encoder", "text_encoder_2")
    objective = SDXLDenoising


SDXL_UNET = register_frontend(SDXLUNet())
SDXL_PIPELINES = register_pipeline_family(SDXLPipelines())
