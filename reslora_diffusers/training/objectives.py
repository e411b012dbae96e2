"""What ``train_text_to_image.py`` does differently per pipeline family, behind one interface.

An :class:`Objective` holds the base pipeline's frozen components and knows how its family
trains: the default targets and resolution, the tokenizer of the dataset, the loss of a batch,
and real inputs of every trained component for the merge report. The family of the loaded
pipeline (:func:`~reslora_diffusers.frontends.pipeline_family`) picks the objective:

* :class:`DenoisingObjective`, Stable Diffusion UNets (DDPM): ``x_t = sqrt(abar_t) x0 +
  sqrt(1 - abar_t) eps``, target ``eps`` (or ``v``), min-SNR weights; :class:`SDXLDenoising`
  adds SDXL's second text encoder, pooled text and size conditioning;
* :class:`SD3FlowMatching` and :class:`FluxFlowMatching`, SD3's and Flux's transformers
  (rectified flow, :mod:`.flow_matching`): ``x_sigma = (1 - sigma) x0 + sigma eps``, target
  ``eps - x0``, weights by ``--weighting_scheme``; VAE latents ``(z - shift_factor) *
  scaling_factor``, prompts through the pipeline's CLIP and T5 encoders as its
  ``encode_prompt`` does (the same states, checked in the tests; written out here because a
  trained encoder runs wrapped by DDP, which ``encode_prompt`` cannot call).

Every objective splits its loss into the parts a cache can hold (:class:`Objective`): pixels ->
the VAE posterior (cached by ``--cache_latents``; its sample is drawn every step), captions ->
the denoiser's text inputs (cached by ``--cache_text_embeddings``), and the loss of the two.
Image sides are multiples of the objective's :attr:`~Objective.side_step` (the VAE factor times
what the denoiser needs: UNet downsampling, SD3 patches, Flux 2 x 2 packing).
"""

from __future__ import annotations

import argparse
import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..frontends import (
    DIT_ATTENTION_TARGETS,
    FLUX_PIPELINES,
    SD3_PIPELINES,
    SD_PIPELINES,
    UNET_FEEDFORWARD_TARGETS,
    UNET_TARGETS,
    PipelineFamily,
    pipeline_family,
)
from ..frontends.flux import latent_image_ids, pack_latents
from ..frontends.sd_unet import is_sdxl_unet
from .data import BucketBatchSampler, collate, tokenize
from .flow_matching import flow_matching_loss, noisy_latents, sample_sigmas, sample_u

#: Attention and feed-forward projections of the UNet's transformer blocks: a new shape needs
#: the feed-forward layers too (on the embedded base, 800 steps reach 53-80 % prompt accuracy
#: with them; the attention projections alone stayed below 10 %).
DEFAULT_UNET_TARGETS = [*UNET_TARGETS, *UNET_FEEDFORWARD_TARGETS]
#: the side step of ``--aspect_ratio_buckets auto`` at full size (kohya-ss's and SDXL's buckets)
AUTO_BUCKET_STEP = 64


class Objective(ABC):
    """A pipeline family's training; subclasses set the class attributes and the loss.

    The loss is split so that its inputs can be cached whatever the family: pixels -> the VAE
    posterior's parameters (:meth:`latent_distribution`, what ``--cache_latents`` stores) -> the
    denoiser's clean latents (:meth:`clean_latents`); captions -> the denoiser's text inputs
    (:meth:`encode_text`, what ``--cache_text_embeddings`` stores); and the loss of clean
    latents and text inputs (:meth:`latent_loss`). :meth:`loss` takes either from the batch."""

    #: the pipeline families this objective trains
    families: tuple[PipelineFamily, ...] = ()
    #: how the model card and error messages name the denoiser
    denoiser_title = "denoiser"
    #: script flags this objective does not read: refused when set to another value than their default
    unused_flags: tuple[str, ...] = ()

    def __init__(self, pipe, args: argparse.Namespace) -> None:
        self.args = args
        self.family = pipeline_family(pipe)
        self.pipeline_class = type(pipe)
        #: every model of the pipeline (denoiser, text encoders, VAE), frozen
        self.models = {name: m for name, m in pipe.components.items() if isinstance(m, nn.Module)}
        for model in self.models.values():
            model.requires_grad_(False)
        vae = self.models["vae"]
        #: pixels per latent
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        #: clean latents are ``(z - shift_factor) * scaling_factor`` (SD's VAEs have no shift)
        self.shift_factor = vae.config.get("shift_factor") or 0.0
        self.scaling_factor = vae.config.scaling_factor
        #: each text encoder's tokenizer (``text_encoder_2`` -> ``tokenizer_2``)
        self.tokenizers = {
            name: getattr(pipe, name.replace("text_encoder", "tokenizer")) for name in self.text_encoder_names
        }

    @classmethod
    def trains(cls, pipe) -> bool:
        """Whether this objective trains ``pipe`` (default: a pipeline of one of its families)."""
        return pipeline_family(pipe) in cls.families

    @property
    def denoiser(self) -> str:
        return self.family.denoiser

    @property
    @abstractmethod
    def text_encoder_names(self) -> tuple[str, ...]:
        """The text encoders :meth:`encode_text` runs (those of the pipeline)."""

    def trained_names(self, train_text_encoder: bool) -> list[str]:
        """The denoiser and, with ``--train_text_encoder``, the text encoders the family's LoRA
        loader loads (in that order: the order adapters are added in)."""
        encoders = [n for n in self.family.text_encoders if n in self.models] if train_text_encoder else []
        return [self.denoiser, *encoders]

    def check_flags(self, args: argparse.Namespace, defaults: dict) -> None:
        """Refuse flags of the other objectives that were given (``ValueError`` naming the flag)."""
        for flag in self.unused_flags:
            if getattr(args, flag) != defaults[flag]:
                raise ValueError(
                    f"--{flag} does not apply to {self.family.name} pipelines (they train with "
                    f"{type(self).__name__}); leave it at its default"
                )

    def fill_defaults(self, args: argparse.Namespace) -> None:
        """Set the flags whose default depends on the family (``--target_modules``)."""
        if args.target_modules is None:
            args.target_modules = self.default_targets()

    @abstractmethod
    def default_targets(self) -> list[str]: ...

    @abstractmethod
    def default_resolution(self) -> int: ...

    # -- image sizes -----------------------------------------------------------------------
    @abstractmethod
    def latent_multiple(self) -> int:
        """Latents per side step the denoiser needs (downsampling, patches, packing)."""

    def side_reason(self) -> str:
        """Why the sides are multiples of :attr:`side_step` (for the error)."""
        return f"the VAE's factor {self.vae_scale} x {self.latent_multiple()} latents"

    @property
    def side_step(self) -> int:
        """Image sides must be multiples of this many pixels: ``vae_scale * latent_multiple``."""
        return self.vae_scale * self.latent_multiple()

    def max_side(self) -> int | None:
        """The largest image side the denoiser takes, in pixels (None: no limit)."""
        return None

    def check_resolution(self, resolution: int) -> None:
        """Refuse a resolution the denoiser cannot take whole (``ValueError``)."""
        if resolution % self.side_step:
            raise ValueError(
                f"--resolution {resolution} must be a multiple of {self.side_step} for "
                f"{self.family.name} pipelines ({self.side_reason()})"
            )

    def check_buckets(self, buckets: list[tuple[int, int]]) -> None:
        """Refuse a bucket whose sides are not multiples of :attr:`side_step` or too large."""
        limit = self.max_side()
        for h, w in buckets:
            if h % self.side_step or w % self.side_step:
                raise ValueError(
                    f"--aspect_ratio_buckets: bucket {h},{w}: sides must be multiples of {self.side_step} "
                    f"px for {self.family.name} pipelines ({self.side_reason()})"
                )
            if limit is not None and max(h, w) > limit:
                raise ValueError(
                    f"--aspect_ratio_buckets: bucket {h},{w}: the {self.denoiser_title} takes sides "
                    f"up to {limit} px"
                )

    def bucket_step(self, resolution: int) -> int:
        """The side step of ``--aspect_ratio_buckets auto``: ``AUTO_BUCKET_STEP`` (64 px) made a
        multiple of :attr:`side_step`, halved while above ``resolution / 4`` (small models) and
        still a multiple of it."""
        step = math.lcm(AUTO_BUCKET_STEP, self.side_step)
        while step > resolution // 4 and (step // 2) % self.side_step == 0:
            step //= 2
        return step

    # -- inputs (cacheable) ----------------------------------------------------------------
    @property
    def tokenizer(self):
        """The tokenizer that the dataset applies to captions (None: the objective tokenizes)."""
        return None

    def token_length(self, name: str) -> int:
        """Tokens per caption for text encoder ``name`` (default: its tokenizer's length)."""
        return self.tokenizers[name].model_max_length

    def token_ids(self, name: str, captions: list[str]) -> torch.Tensor:
        """Captions tokenized for text encoder ``name``, padded and truncated to :meth:`token_length`."""
        return tokenize(self.tokenizers[name], captions, self.token_length(name))

    @staticmethod
    def device(models: dict[str, nn.Module]) -> torch.device:
        """Where the models run (the VAE is never wrapped by DDP or torch.compile)."""
        return models["vae"].device

    def latent_distribution(self, vae: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The VAE posterior ``N(mean, exp(logvar))`` of pixels in [-1, 1], as its parameters
        ``(B, 2 C, H / f, W / f)`` (mean, then log-variance, on the channel axis)."""
        return vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.parameters

    def clean_latents(
        self, parameters: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The denoiser's ``x0 = (z - shift_factor) * scaling_factor``: ``z`` a sample of the
        posterior drawn from the global random state (training, as diffusers' scripts), or its
        mean when a ``generator`` is given (the merge report's fixed inputs)."""
        posterior = DiagonalGaussianDistribution(parameters)
        z = posterior.mean if generator is not None else posterior.sample()
        # contiguous: the VAE's convolutions may return channels-last strides, and randn_like
        # follows the strides, so the noise would depend on where the latents came from
        return ((z - self.shift_factor) * self.scaling_factor).contiguous()

    def encode_pixels(
        self,
        models: dict[str, nn.Module],
        pixel_values: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Pixels -> the denoiser's clean latents (the VAE part of the loss)."""
        return self.clean_latents(self.latent_distribution(models["vae"], pixel_values), generator)

    @abstractmethod
    def encode_text(
        self, models: dict[str, nn.Module], captions: list[str], input_ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Captions (or the dataset's token ids of them) -> the denoiser's text inputs, every
        tensor with the batch first."""

    def batch_latents(
        self,
        models: dict[str, nn.Module],
        batch: dict,
        dtype: torch.dtype,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Clean latents from the batch's cached ``latent_parameters`` or its ``pixel_values``:
        both draw the posterior sample the same way, so the two agree under one random state."""
        if "latent_parameters" in batch:
            parameters = batch["latent_parameters"].to(self.device(models), dtype)
        else:
            parameters = self.latent_distribution(models["vae"], batch["pixel_values"].to(dtype))
        return self.clean_latents(parameters, generator)

    def batch_text(self, models: dict[str, nn.Module], batch: dict) -> dict[str, torch.Tensor]:
        """The batch's cached ``text_conditioning``, or its captions encoded."""
        if "text_conditioning" in batch:
            device = self.device(models)
            return {k: v.to(device) for k, v in batch["text_conditioning"].items()}
        return self.encode_text(models, batch["captions"], batch.get("input_ids"))

    # -- the loss --------------------------------------------------------------------------
    @abstractmethod
    def latent_loss(
        self, models: dict[str, nn.Module], latents: torch.Tensor, text: dict[str, torch.Tensor], batch: dict
    ) -> torch.Tensor:
        """The loss of clean latents and text inputs (``batch``: the sizes, for families whose
        denoiser reads them); its noise and timesteps come from the global random state."""

    def loss(self, models: dict[str, nn.Module], batch: dict, weight_dtype: torch.dtype) -> torch.Tensor:
        """The loss of one batch; ``models`` are the trained ones as ``accelerator.prepare``
        returned them. Draws, in order: the posterior sample, then :meth:`latent_loss`'s."""
        latents = self.batch_latents(models, batch, weight_dtype)
        text = self.batch_text(models, batch)
        return self.latent_loss(models, latents, text, batch)

    @abstractmethod
    def model_inputs(self, models: dict[str, nn.Module], batch: dict, generator: torch.Generator) -> dict:
        """``{component: keyword inputs}`` for the merge report: the denoiser's noisy input and
        conditioning, each text encoder's token ids (random draws from ``generator``)."""


class DenoisingObjective(Objective):
    """Stable Diffusion UNets: DDPM noise at uniform timesteps, target ``eps`` or ``v``,
    min-SNR weights ``min(snr, gamma) / snr`` (``/ (snr + 1)`` for ``v``) when ``--snr_gamma`` > 0."""

    families = (SD_PIPELINES,)
    denoiser_title = "UNet"
    unused_flags = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale")
    text_encoder_names = ("text_encoder",)

    def __init__(self, pipe, args: argparse.Namespace) -> None:
        from diffusers import DDPMScheduler

        super().__init__(pipe, args)
        self.scheduler = DDPMScheduler.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision
        )
        if args.prediction_type is not None:
            self.scheduler.register_to_config(prediction_type=args.prediction_type)

    @property
    def tokenizer(self):
        return self.tokenizers["text_encoder"]

    def default_targets(self) -> list[str]:
        return list(DEFAULT_UNET_TARGETS)

    def default_resolution(self) -> int:
        return self.models[self.denoiser].config.sample_size * self.vae_scale

    def latent_multiple(self) -> int:
        """``2**(levels - 1)``: the UNet halves the latents at every level but the last."""
        return 2 ** (len(self.models[self.denoiser].config.block_out_channels) - 1)

    def side_reason(self) -> str:
        return f"the VAE's factor {self.vae_scale} x the UNet's {self.latent_multiple()}x downsampling"

    def encode_text(self, models, captions, input_ids=None):
        """``encoder_hidden_states``: the CLIP encoder's last hidden states."""
        ids = input_ids if input_ids is not None else self.token_ids("text_encoder", captions)
        return {
            "encoder_hidden_states": models["text_encoder"](ids.to(self.device(models)), return_dict=False)[0]
        }

    def unet_conditioning(self, text: dict[str, torch.Tensor], batch: dict) -> dict:
        """The UNet's keyword inputs beside the noisy latents and timesteps."""
        return dict(text)

    def latent_loss(self, models, latents, text, batch):
        from diffusers.training_utils import compute_snr

        args, noise_scheduler = self.args, self.scheduler
        noise = torch.randn_like(latents)
        if args.noise_offset:
            noise += args.noise_offset * torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), device=latents.device
            )
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        ).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        unet = models[self.denoiser]
        pred = unet(noisy, timesteps, **self.unet_conditioning(text, batch), return_dict=False)[0]
        if not args.snr_gamma:
            return F.mse_loss(pred.float(), target.float(), reduction="mean")
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.stack([snr, args.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        weights = (
            weights / snr if noise_scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)
        )
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (loss * weights).mean()

    def model_inputs(self, models, batch, generator):
        """Noisy latents (of the VAE mean) at random timesteps and the captions' text states."""
        vae = models["vae"]
        device, dtype = vae.device, vae.dtype
        latents = self.batch_latents(models, batch, dtype, generator)
        size = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (size,), generator=generator)
        texts = {
            name: {"input_ids": self.token_ids(name, batch["captions"]).to(device)}
            for name in self.text_encoder_names
        }
        return {
            self.denoiser: {
                "sample": self.scheduler.add_noise(latents, noise, timesteps),
                "timestep": timesteps.to(device),
                **self.unet_conditioning(self.batch_text(models, batch), batch),
            },
            **texts,
        }


class SDXLDenoising(DenoisingObjective):
    """SDXL UNets: :class:`DenoisingObjective`'s loss, conditioned as diffusers'
    ``train_text_to_image_lora_sdxl.py`` and ``StableDiffusionXLPipeline.encode_prompt`` do. The
    text states are both CLIP encoders' penultimate hidden states side by side (768 + 1280 =
    2048 features in SDXL base), ``text_embeds`` the second encoder's pooled projection, and
    ``time_ids`` six numbers per image, ``original_size + crop_top_left + target_size`` (each
    height first), from the batch's ``original_sizes``, ``crop_top_lefts`` and ``target_sizes``:
    the image's own size before any resize, where the crop starts in the resized image, and the
    size trained at (:mod:`.data`)."""

    text_encoder_names = ("text_encoder", "text_encoder_2")

    @classmethod
    def trains(cls, pipe) -> bool:
        return super().trains(pipe) and is_sdxl_unet(pipe.unet)

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


@dataclass
class FlowBatch:
    """One batch of the flow-matching objective, in the transformer's layout (Flux: packed tokens)."""

    #: the transformer's keyword arguments (noisy input, timestep, text states, ...)
    inputs: dict
    #: ``x0``, ``eps`` and ``sigma`` (one per sample) of ``x_sigma = (1 - sigma) x0 + sigma eps``
    latents: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor


class FlowMatchingObjective(Objective):
    """SD3 and Flux: the rectified-flow objective of :mod:`.flow_matching` (module doc)."""

    denoiser_title = "transformer"
    unused_flags = ("snr_gamma", "noise_offset", "prediction_type")
    #: the ``--weighting_scheme`` of diffusers' LoRA script for the family
    default_weighting = "none"
    #: the pipeline's CLIP encoders and its T5 encoder, by component name
    clip_encoders: tuple[str, ...] = ()
    t5_encoder = ""

    def __init__(self, pipe, args: argparse.Namespace) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(pipe, args)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.weighting = args.weighting_scheme or self.default_weighting
        #: T5 tokens per prompt: the pipeline's ``encode_prompt`` default (what inference uses)
        self.max_sequence_length = (
            inspect.signature(pipe.encode_prompt).parameters["max_sequence_length"].default
        )
        self.denoiser_config = self.models[self.denoiser].config

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        """The CLIP encoders and the T5 encoder where the pipeline has one."""
        names = (*self.clip_encoders, self.t5_encoder)
        return tuple(n for n in names if n in self.models)

    def default_targets(self) -> list[str]:
        return list(DIT_ATTENTION_TARGETS)

    def fill_defaults(self, args):
        """Also ``--weighting_scheme`` (the family's, as diffusers' script for it has)."""
        super().fill_defaults(args)
        args.weighting_scheme = self.weighting

    def default_resolution(self) -> int:
        """The pipeline's default size: ``sample_size`` latents (128 for SD3 and Flux) x the VAE factor."""
        return self.denoiser_config.get("sample_size", 128) * self.vae_scale

    def latent_loss(self, models, latents, text, batch):
        """``mean_b(w(sigma_b) mean((v_theta(x_sigma) - (eps - x0))^2))``."""
        step = self.flow_inputs(latents, text)
        pred = models[self.denoiser](**step.inputs, return_dict=False)[0]
        return flow_matching_loss(pred, step.latents, step.noise, step.sigmas, self.weighting)

    def model_inputs(self, models, batch, generator):
        """The transformer's inputs at the VAE mean and sigmas drawn as in training; token ids of
        the text encoders the family trains."""
        vae = models["vae"]
        step = self.flow_batch(models, batch, vae.dtype, generator)
        texts = {
            name: {"input_ids": self.token_ids(name, batch["captions"]).to(vae.device)}
            for name in self.family.text_encoders
            if name in self.models
        }
        return {self.denoiser: step.inputs, **texts}

    def flow_batch(
        self,
        models: dict[str, nn.Module],
        batch: dict,
        dtype: torch.dtype,
        generator: torch.Generator | None = None,
    ) -> FlowBatch:
        """Clean latents, noise, sigmas and the transformer's inputs of a batch. Without a
        ``generator`` the draws (VAE sample, ``eps``, ``u``) come from the global random state,
        as training wants; with one, the VAE mean is used and the draws come from it."""
        latents = self.batch_latents(models, batch, dtype, generator)
        return self.flow_inputs(latents, self.batch_text(models, batch), generator)

    def flow_inputs(
        self, latents: torch.Tensor, text: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> FlowBatch:
        """Noise ``eps``, ``u`` and sigmas drawn (from ``generator`` if given), ``x_sigma`` and
        the transformer's inputs for clean latents and text inputs."""
        noise = torch.randn(
            latents.shape, generator=generator, device="cpu" if generator else latents.device
        ).to(latents)
        u = sample_u(
            self.weighting,
            latents.shape[0],
            self.args.logit_mean,
            self.args.logit_std,
            self.args.mode_scale,
            generator=generator,
        )
        timesteps, sigmas = (t.to(latents.device) for t in sample_sigmas(self.scheduler, u))
        noisy = noisy_latents(latents, noise, sigmas)
        inputs = self.transformer_inputs(noisy, timesteps, text)
        return FlowBatch(inputs, self.layout(latents), self.layout(noise), sigmas)

    def token_length(self, name: str) -> int:
        """CLIP: the tokenizer's length (77); T5: ``max_sequence_length``."""
        return self.max_sequence_length if name == self.t5_encoder else super().token_length(name)

    def t5_states(self, models, captions: list[str]) -> torch.Tensor:
        """The T5 encoder's last hidden states; zeros where the pipeline has no T5 (as it does)."""
        device = self.device(models)
        if self.t5_encoder not in models:
            size = (len(captions), self.max_sequence_length, self.denoiser_config.joint_attention_dim)
            return torch.zeros(size, device=device, dtype=models["vae"].dtype)
        ids = self.token_ids(self.t5_encoder, captions).to(device)
        return models[self.t5_encoder](ids)[0]

    @abstractmethod
    def transformer_inputs(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict) -> dict:
        """The transformer's keyword arguments for noisy latents ``(B, C, H, W)``."""

    def layout(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, H, W)`` as the transformer reads and predicts them."""
        return latents


class SD3FlowMatching(FlowMatchingObjective):
    """SD3 / SD3.5: CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width
    and followed by the T5 states; the pooled state is both CLIPs' projections side by side;
    the transformer takes timesteps ``1000 sigma``."""

    families = (SD3_PIPELINES,)
    unused_flags = (*FlowMatchingObjective.unused_flags, "guidance_scale")
    default_weighting = "logit_normal"
    clip_encoders = ("text_encoder", "text_encoder_2")
    t5_encoder = "text_encoder_3"

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


class FluxFlowMatching(FlowMatchingObjective):
    """Flux: CLIP-L's pooled state and the T5 states, text ids 0; latents packed into 2 x 2
    patch tokens with ids ``(0, row, col)``; timesteps ``sigma``; the guidance embedding gets
    ``--guidance_scale`` (Flux dev; models without it ignore the flag)."""

    families = (FLUX_PIPELINES,)
    clip_encoders = ("text_encoder",)
    t5_encoder = "text_encoder_2"

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


#: tried in order: the first that :meth:`~Objective.trains` the pipeline (SDXL before other UNets)
OBJECTIVES: tuple[type[Objective], ...] = (
    SDXLDenoising,
    DenoisingObjective,
    SD3FlowMatching,
    FluxFlowMatching,
)


def pipeline_kwargs(path: str, revision: str | None) -> dict:
    """``safety_checker=None`` for pipelines that have one (others would warn about the argument)."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(path, revision=revision)
    return {"safety_checker": None} if "safety_checker" in config else {}


def load_objective(args: argparse.Namespace, defaults: dict) -> Objective:
    """Load the base pipeline of ``--pretrained_model_name_or_path`` and the objective of its
    family; fill ``--target_modules`` and ``--weighting_scheme`` where not given; refuse flags of
    other objectives (``defaults``: the parser's). Errors are ``ValueError`` naming the problem."""
    from diffusers import DiffusionPipeline

    path = args.pretrained_model_name_or_path
    try:
        pipe = DiffusionPipeline.from_pretrained(
            path, revision=args.revision, variant=args.variant, **pipeline_kwargs(path, args.revision)
        )
        objective_class = next((o for o in OBJECTIVES if o.trains(pipe)), None)
        if objective_class is None:
            trained = ", ".join(sorted({f.name for o in OBJECTIVES for f in o.families}))
            raise ValueError(
                f"no training objective for {pipeline_family(pipe).name} pipelines (trained: {trained})"
            )
        objective = objective_class(pipe, args)
    except (OSError, ValueError) as err:
        raise ValueError(f"--pretrained_model_name_or_path: cannot load {path}: {_one_line(err)}") from err
    objective.check_flags(args, defaults)
    objective.fill_defaults(args)
    return objective


def real_inputs(
    objective: Objective, models: dict[str, nn.Module], dataset, batch_size: int, seed: int, num: int
) -> dict[str, list[dict]]:
    """``{component: num batches of keyword inputs}`` from the training data (up to 8 images of
    one bucket a batch, in the order of a :class:`~.data.BucketBatchSampler` seeded with ``seed``),
    for calibrating and measuring the merge."""
    gen = torch.Generator().manual_seed(seed)
    sampler = BucketBatchSampler(dataset.bucket_of, min(batch_size, 8), seed)
    keys: list[list[tuple[int, int]]] = []
    while len(keys) < num:
        sampler.start_epoch(len(keys))
        keys += list(sampler)
    out: dict[str, list[dict]] = {}
    with torch.no_grad():
        for batch_keys in keys[:num]:
            batch = collate([dataset[key] for key in batch_keys])
            for name, inputs in objective.model_inputs(models, batch, gen).items():
                out.setdefault(name, []).append(inputs)
    return out


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
