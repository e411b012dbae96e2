"""Wan 2.x text-to-video: ``WanTransformer3DModel``, ``WanPipeline`` and their rectified-flow
training on video clips (:class:`WanFlowMatching`).

The transformer is one chain of identical blocks (40 in the 14B models, 30 in 1.3B): self-
attention over the video's tokens (``attn1``), cross-attention to the UMT5 text states
(``attn2``), a GELU feed-forward layer (``ffn``). The default targets are both attentions'
projections, ``to_q to_k to_v to_out.0`` (:data:`WAN_ATTENTION_TARGETS`); each role is one
unbroken chain through every block, and the cross-attention ``to_k``/``to_v`` read the text
states, the same tensor in every block (their ``is`` and calibrated ``ms`` merges are exact).
Latents are 5-D, ``(B, 16, 1 + (frames - 1) / 4, H / 8, W / 8)``; the transformer patches
them 1 x 2 x 2.

Wan 2.2's A14B models have a second expert, ``transformer_2``, for the low-noise steps;
diffusers loads a LoRA for it from a file of its own (``load_lora_weights(...,
load_into_transformer_2=True)``), so an export holds one transformer's weights, and the
training script trains pipelines of one transformer (Wan 2.1 T2V 1.3B and 14B).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from ..objectives import FlowMatchingObjective
from .base import register_frontend, to_model
from .dit import DiTFrontEnd
from .pipelines import PipelineFamily, register_pipeline_family

#: self- and cross-attention projections of every block (``attn1.*`` and ``attn2.*``)
WAN_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: the feed-forward layers of every block
WAN_FEEDFORWARD_TARGETS = ("ffn.net.0.proj", "ffn.net.2")
#: UMT5-XXL, whose last hidden states are the prompt's states (``WanLoraLoaderMixin`` loads LoRA
#: weights for the transformers alone, so it is never trained)
WAN_TEXT_ENCODER = "text_encoder"
#: Wan 2.2 A14B's low-noise expert
WAN_SECOND_EXPERT = "transformer_2"
#: frames a clip trains on when ``--num_frames`` is not given (2 s at Wan's 16 fps)
WAN_TRAIN_FRAMES = 33
#: frames the demo and validation draw (1 s at 16 fps): their first, middle and last are shown
WAN_PREVIEW_FRAMES = 17


class WanTransformer(DiTFrontEnd):
    name = "wan_transformer"
    model_class = "WanTransformer3DModel"

    def default_targets(self, model: nn.Module) -> list[str]:
        return list(WAN_ATTENTION_TARGETS)

    def synthetic_inputs(self, model, num=2, seed=0, batch=2, text_tokens=16, frames=2, grid=(4, 4)):
        """N(0, 1) latents of ``frames`` latent frames on a ``grid`` (in latents; the model
        patches 2 x 2), timesteps uniform in [0, 1000) (``1000 sigma``), N(0, 1) text states."""
        cfg = model.config
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(num):
            kwargs = {
                "hidden_states": torch.randn(batch, cfg.in_channels, frames, *grid, generator=gen),
                "timestep": torch.rand(batch, generator=gen) * 1000,
                "encoder_hidden_states": torch.randn(batch, text_tokens, cfg.text_dim, generator=gen),
            }
            out.append(to_model(kwargs, model))
        return out


class WanFlowMatching(FlowMatchingObjective):
    """Wan on video clips (``pixel_values`` ``(B, 3, F, H, W)``, ``F = 1 + 4 k``): the VAE
    posterior's sample normalised per channel, ``(z - latents_mean) / latents_std`` (the VAE's
    config; the pipeline decodes ``z = x std + mean``); sigmas from the scheduler's shift as its
    config says (``flow_shift`` of Wan's UniPC scheduler, ``shift`` of a flow-match Euler one,
    ``s' = shift s / (1 + (shift - 1) s)``) and timesteps ``1000 sigma``; the prompt as
    ``WanPipeline`` encodes it: cleaned (``prompt_clean``), tokenized to the pipeline's
    ``max_sequence_length`` (512, what its call passes), UMT5's last hidden states, zero after
    each prompt's own tokens."""

    target_modules = WAN_ATTENTION_TARGETS
    #: no guidance embedding; no text-encoder LoRA (the pipeline's loader loads the transformers' alone)
    unused_flags = (*FlowMatchingObjective.unused_flags, "guidance_scale", "train_text_encoder")
    default_frames = WAN_TRAIN_FRAMES

    def __init__(self, pipe, args, family) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if getattr(pipe, WAN_SECOND_EXPERT, None) is not None:
            raise ValueError(
                f"this Wan pipeline has two experts ({WAN_SECOND_EXPERT}, boundary_ratio "
                f"{pipe.config.boundary_ratio}): the script trains pipelines of one transformer (Wan 2.1); "
                "train an expert with add_reslora and export it alone (README, Wan)"
            )
        super().__init__(pipe, args, family)
        # what inference encodes prompts to: the call's default, not encode_prompt's (226)
        self.max_sequence_length = (
            inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
        )
        sched = pipe.scheduler.config
        shift = sched.get("flow_shift") or sched.get("shift") or 1.0
        self.scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=sched.get("num_train_timesteps", 1000), shift=shift
        )
        vae = self.models["vae"]
        self.latent_mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        self.latent_std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        #: a clip's frames are ``1 + k * frame_step``: the VAE's temporal compression
        self.frame_step = vae.config.scale_factor_temporal

    @staticmethod
    def vae_downsampling(vae: nn.Module) -> int:
        """The video VAE's spatial compression, as its config states it."""
        return vae.config.scale_factor_spatial

    @property
    def latent_channels(self) -> int:
        return self.models["vae"].config.z_dim

    def latent_multiple(self) -> int:
        """The transformer's spatial patch size."""
        return self.denoiser_config.patch_size[1]

    def side_reason(self) -> str:
        return f"the VAE's factor {self.vae_scale} x the transformer's patch size {self.latent_multiple()}"

    def default_resolution(self) -> int:
        """480: the height of ``WanPipeline``'s default 480 x 832 video (the 14B models also take 720)."""
        return inspect.signature(self.pipeline_class.__call__).parameters["height"].default

    def normalize_latents(self, z):
        """``(z - latents_mean) / latents_std``, per channel."""
        mean, std = (t.to(z) for t in (self.latent_mean, self.latent_std))
        return (z - mean) / std

    def encode_text(self, models, captions, input_ids=None):
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        device = self.device(models)
        tokens = self.tokenizers[WAN_TEXT_ENCODER](
            [prompt_clean(c) for c in captions],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(device)
        states = models[WAN_TEXT_ENCODER](tokens.input_ids.to(device), mask).last_hidden_state
        # each prompt's own tokens, then zeros (the pipeline cuts at the mask's length and pads)
        lengths = mask.gt(0).sum(dim=1, keepdim=True)
        keep = torch.arange(states.shape[1], device=device)[None] < lengths
        return {"encoder_hidden_states": states * keep[..., None].to(states.dtype)}

    def transformer_inputs(self, noisy, timesteps, text):
        return {"hidden_states": noisy, "timestep": timesteps, **text}


class WanPipelines(PipelineFamily):
    """``WanPipeline`` and the other pipelines around a ``WanTransformer3DModel``.

    ComfyUI (checked at v0.8.0) maps no diffusers-format Wan key, so the family writes the
    ComfyUI layout as well (:mod:`reslora_diffusers.export.comfyui`). A LoRA file holds one
    transformer: Wan 2.2 A14B's second expert (``transformer_2``, a component diffusers loads
    LoRA weights into) is exported as ``transformer=pipe.transformer_2`` and loaded with
    ``load_lora_weights(..., load_into_transformer_2=True)``.
    """

    name = "wan"
    title = "Wan"
    pipeline_class = "WanPipeline"
    denoiser = "transformer"
    denoiser_family = WanTransformer.name
    text_encoders = ()
    prompt_encoders = (WAN_TEXT_ENCODER,)
    lora_scale_kwarg = "attention_kwargs"
    formats = ("diffusers", "comfyui")
    objective = WanFlowMatching

    @property
    def components(self) -> tuple[str, ...]:
        """The transformer and Wan 2.2's second expert (what ``WanLoraLoaderMixin`` loads into)."""
        return (self.denoiser, WAN_SECOND_EXPERT)

    def check_components(self, components):
        """One transformer per file (module doc)."""
        if WAN_SECOND_EXPERT in components:
            raise ValueError(
                f"a Wan LoRA file holds one transformer: export {WAN_SECOND_EXPERT} alone as "
                f"transformer=pipe.{WAN_SECOND_EXPERT} and load it with "
                "load_lora_weights(..., load_into_transformer_2=True)"
            )
        super().check_components(components)

    def generation_kwargs(self) -> dict:
        """Short videos for the demo and validation (:data:`WAN_PREVIEW_FRAMES`)."""
        return {"num_frames": WAN_PREVIEW_FRAMES}


WAN_TRANSFORMER = register_frontend(WanTransformer())
WAN_PIPELINES = register_pipeline_family(WanPipelines())
