"""The objective contract: what training a diffusion family needs, behind one interface.

An :class:`Objective` holds the base pipeline's frozen components and knows how its family
trains: the default targets and resolution, the tokenizer of the dataset, the loss of a batch,
and real inputs of every trained component for the merge report. Each family file of
:mod:`reslora_diffusers.frontends` declares its objective (``PipelineFamily.objective``), a
subclass of :class:`~.denoising.DenoisingObjective` (DDPM, UNets) or
:class:`~.flow_matching.FlowMatchingObjective` (rectified flow, diffusion transformers).

Every objective splits its loss into the parts a cache can hold: pixels -> the VAE posterior
(cached by ``--cache_latents``; its sample is drawn every step), captions -> the denoiser's
text inputs (cached by ``--cache_text_embeddings``), and the loss of the two. Image sides are
multiples of the objective's :attr:`~Objective.side_step` (the VAE factor times what the
denoiser needs: UNet downsampling, SD3 patches, Flux 2 x 2 packing).
"""

from __future__ import annotations

import argparse
import math
from abc import ABC, abstractmethod

import torch
import torch.nn as nn

#: the side step of ``--aspect_ratio_buckets auto`` at full size (kohya-ss's and SDXL's buckets)
AUTO_BUCKET_STEP = 64


def tokenize(tokenizer, captions: list[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids padded and truncated to ``max_length`` (default: the tokenizer's own)."""
    return tokenizer(
        captions,
        max_length=max_length or tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids


class Objective(ABC):
    """A pipeline family's training; subclasses set the class attributes and the loss.

    The loss is split so that its inputs can be cached whatever the family: pixels -> the VAE
    posterior's parameters (:meth:`latent_distribution`, what ``--cache_latents`` stores) -> the
    denoiser's clean latents (:meth:`clean_latents`); captions -> the denoiser's text inputs
    (:meth:`encode_text`, what ``--cache_text_embeddings`` stores); and the loss of clean
    latents and text inputs (:meth:`latent_loss`). :meth:`loss` takes either from the batch."""

    #: the ``--target_modules`` a run trains when it names none
    target_modules: tuple[str, ...] = ()
    #: how the model card and error messages name the denoiser
    denoiser_title = "denoiser"
    #: script flags this objective does not read: refused when set to another value than their default
    unused_flags: tuple[str, ...] = ()
    #: video objectives train on clips of ``1 + k * frame_step`` frames (the VAE's temporal
    #: compression), ``default_frames`` of them unless ``--num_frames`` says; 0: images
    frame_step = 0
    default_frames = 0

    def __init__(self, pipe, args: argparse.Namespace, family) -> None:
        self.args = args
        #: the :class:`~reslora_diffusers.frontends.PipelineFamily` of ``pipe`` (which declares
        #: this objective): its denoiser, its text encoders, its name for messages
        self.family = family
        self.pipeline_class = type(pipe)
        #: every model of the pipeline (denoiser, text encoders, VAE), frozen
        self.models = {name: m for name, m in pipe.components.items() if isinstance(m, nn.Module)}
        for model in self.models.values():
            model.requires_grad_(False)
        vae = self.models["vae"]
        #: pixels per latent
        self.vae_scale = self.vae_downsampling(vae)
        #: clean latents are ``(z - shift_factor) * scaling_factor`` (SD's VAEs have no shift; a
        #: family whose VAE normalises otherwise overrides :meth:`normalize_latents`)
        self.shift_factor = vae.config.get("shift_factor") or 0.0
        self.scaling_factor = vae.config.get("scaling_factor", 1.0)
        #: each text encoder's tokenizer (``text_encoder_2`` -> ``tokenizer_2``)
        self.tokenizers = {
            name: getattr(pipe, name.replace("text_encoder", "tokenizer")) for name in self.text_encoder_names
        }

    @property
    def denoiser(self) -> str:
        return self.family.denoiser

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        """The text encoders :meth:`encode_text` runs: the family's ``prompt_encoders`` that the
        pipeline has (an SD3 pipeline loaded without its T5 encoder has two)."""
        return tuple(n for n in self.family.prompt_encoders if n in self.models)

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

    def default_targets(self) -> list[str]:
        """The targets of a run that names none (:attr:`target_modules`)."""
        return list(self.target_modules)

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
    def vae_downsampling(vae: nn.Module) -> int:
        """Pixels per latent of the pipeline's VAE: ``2 ** (levels - 1)`` of an ``AutoencoderKL``."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE's latents (its posterior's parameters have twice as many)."""
        return self.models["vae"].config.latent_channels

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
        """The denoiser's ``x0`` (:meth:`normalize_latents` of ``z``): ``z`` a sample of the
        posterior drawn from the global random state (training, as diffusers' scripts), or its
        mean when a ``generator`` is given (the merge report's fixed inputs)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(parameters)
        z = posterior.mean if generator is not None else posterior.sample()
        # contiguous: the VAE's convolutions may return channels-last strides, and randn_like
        # follows the strides, so the noise would depend on where the latents came from
        return self.normalize_latents(z).contiguous()

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The denoiser's latents of VAE latents ``z``: ``(z - shift_factor) * scaling_factor``."""
        return (z - self.shift_factor) * self.scaling_factor

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
