"""Stable Diffusion 1.x and 2.x: the ``UNet2DConditionModel`` model family and the pipeline family.

Every target of the UNet (attention projections, feed-forward layers, resnet convolutions) is an
ordinary ResLoRA layer under diffusers' own attention processors; the q/k/v projections that
read one tensor share one ``A`` product (:mod:`reslora_diffusers.core.fusion`). The pipelines
have one CLIP text encoder; they train with DDPM (:class:`SDDenoising`: epsilon or, for SD 2.x,
v-prediction, read from the scheduler). SDXL, a UNet with more conditioning and a second text
encoder, is its own family (:mod:`.sdxl`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..objectives import DenoisingObjective
from .base import FrontEnd, is_instance, register_frontend, to_model
from .pipelines import PipelineFamily, register_pipeline_family

#: The attention projections (diffusers' own default for UNet LoRA).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
#: The transformer blocks' feed-forward layers (GEGLU input projection, output projection),
#: which kohya-ss's LoRA trains by default too.
UNET_FEEDFORWARD_TARGETS = ["ff.net.0.proj", "ff.net.2"]
#: The resnet convolutions and the down/up-sampler convolutions (LoCon, as kohya-ss and
#: LyCORIS train them); ``conv`` matches ``downsamplers.0.conv`` and ``upsamplers.0.conv``.
UNET_CONV_TARGETS = ["conv1", "conv2", "conv_shortcut", "conv"]
#: What the training script trains on a UNet by default: attention and feed-forward projections
#: of its transformer blocks (on the embedded base, 800 steps reach 53-80 % prompt accuracy with
#: the feed-forward layers; the attention projections alone stayed below 10 %).
DEFAULT_UNET_TARGETS = [*UNET_TARGETS, *UNET_FEEDFORWARD_TARGETS]


class SDUNet(FrontEnd):
    """``UNet2DConditionModel``: the attention projections by default, synthetic latents."""

    name = "sd_unet"
    priority = 20

    def matches(self, model):
        return is_instance(model, "diffusers", ("UNet2DConditionModel",))

    def default_targets(self, model):
        return list(UNET_TARGETS)

    def synthetic_inputs(self, model, num=2, seed=0, batch=2):
        """N(0, 1) latents (the noisy-latent distribution at large t), uniform timesteps,
        N(0, 1) text states, and :meth:`added_conditioning` (none here)."""
        cfg = model.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(num):
            kwargs = {
                "sample": torch.randn(batch, cfg.in_channels, size, size, generator=gen),
                "timestep": torch.randint(0, 1000, (batch,), generator=gen),
                "encoder_hidden_states": torch.randn(batch, 16, cfg.cross_attention_dim, generator=gen),
                **self.added_conditioning(model, batch, size, gen),
            }
            out.append(to_model(kwargs, model))
        return out

    def added_conditioning(self, model: nn.Module, batch: int, size: int, gen: torch.Generator) -> dict:
        """Keyword inputs beyond latents, timesteps and text states (a family with more
        conditioning adds them)."""
        return {}


class SDDenoising(DenoisingObjective):
    """DDPM on the UNet, prompts through the CLIP encoder's last hidden states (the dataset
    tokenizes the captions with its tokenizer)."""

    target_modules = tuple(DEFAULT_UNET_TARGETS)

    @property
    def tokenizer(self):
        return self.tokenizers["text_encoder"]

    def encode_text(self, models, captions, input_ids=None):
        """``encoder_hidden_states``: the CLIP encoder's last hidden states."""
        ids = input_ids if input_ids is not None else self.token_ids("text_encoder", captions)
        return {
            "encoder_hidden_states": models["text_encoder"](ids.to(self.device(models)), return_dict=False)[0]
        }


class SDPipelines(PipelineFamily):
    """``StableDiffusionPipeline`` (SD 1.x, 2.x) and every pipeline around a UNet of this family."""

    name = "stable_diffusion"
    title = "Stable Diffusion"
    #: before SDXL: a text encoder alone is SD's (the oldest family)
    priority = 10
    pipeline_class = "StableDiffusionPipeline"
    denoiser = "unet"
    denoiser_family = SDUNet.name
    text_encoders = ("text_encoder",)
    prompt_encoders = ("text_encoder",)
    lora_scale_kwarg = "cross_attention_kwargs"
    formats = ("diffusers", "kohya")
    objective = SDDenoising


SD_UNET = register_frontend(SDUNet())
SD_PIPELINES = register_pipeline_family(SDPipelines())
