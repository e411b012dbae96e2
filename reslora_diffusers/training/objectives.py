"""What ``train_text_to_image.py`` does differently per pipeline family, behind one interface.

An :class:`Objective` holds the base pipeline's frozen components and knows how its family
trains: the default targets and resolution, the tokenizer of the dataset, the loss of a batch,
and real inputs of every trained component for the merge report. The family of the loaded
pipeline (:func:`~reslora_diffusers.frontends.pipeline_family`) picks the objective:

* :class:`DenoisingObjective`, Stable Diffusion UNets (DDPM): ``x_t = sqrt(abar_t) x0 +
  sqrt(1 - abar_t) eps``, target ``eps`` (or ``v``), min-SNR weights;
* :class:`SD3FlowMatching` and :class:`FluxFlowMatching`, SD3's and Flux's transformers
  (rectified flow, :mod:`.flow_matching`): ``x_sigma = (1 - sigma) x0 + sigma eps``, target
  ``eps - x0``, weights by ``--weighting_scheme``; VAE latents ``(z - shift_factor) *
  scaling_factor``, prompts through the pipeline's CLIP and T5 encoders as its
  ``encode_prompt`` does (the same states, checked in the tests; written out here because a
  trained encoder runs wrapped by DDP, which ``encode_prompt`` cannot call).
"""

from __future__ import annotations

import argparse
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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
from .data import collate, tokenize
from .flow_matching import flow_matching_loss, noisy_latents, sample_sigmas, sample_u

#: Attention and feed-forward projections of the UNet's transformer blocks: a new shape needs
#: the feed-forward layers too (on the embedded base, 800 steps reach 53-80 % prompt accuracy
#: with them; the attention projections alone stayed below 10 %).
DEFAULT_UNET_TARGETS = [*UNET_TARGETS, *UNET_FEEDFORWARD_TARGETS]


class Objective(ABC):
    """A pipeline family's training; subclasses set the class attributes and the loss."""

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
        #: pixels per latent
        self.vae_scale = 2 ** (len(self.models["vae"].config.block_out_channels) - 1)

    @property
    def denoiser(self) -> str:
        return self.family.denoiser

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

    def check_resolution(self, resolution: int) -> None:
        """Refuse a resolution the VAE does not map to whole latents (``ValueError``)."""
        if resolution % self.vae_scale:
            raise ValueError(
                f"--resolution {resolution} must be a multiple of {self.vae_scale} (the VAE's factor)"
            )

    @property
    def tokenizer(self):
        """The tokenizer that the dataset applies to captions (None: the objective tokenizes)."""
        return None

    @abstractmethod
    def loss(self, models: dict[str, nn.Module], batch: dict, weight_dtype: torch.dtype) -> torch.Tensor:
        """The loss of one batch; ``models`` are the trained ones as ``accelerator.prepare`` returned them."""

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

    def __init__(self, pipe, args: argparse.Namespace) -> None:
        from diffusers import DDPMScheduler

        super().__init__(pipe, args)
        self.scheduler = DDPMScheduler.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision
        )
        if args.prediction_type is not None:
            self.scheduler.register_to_config(prediction_type=args.prediction_type)
        self._tokenizer = pipe.tokenizer

    @property
    def tokenizer(self):
        return self._tokenizer

    def default_targets(self) -> list[str]:
        return list(DEFAULT_UNET_TARGETS)

    def default_resolution(self) -> int:
        return self.models[self.denoiser].config.sample_size * self.vae_scale

    def loss(self, models, batch, weight_dtype):
        from diffusers.training_utils import compute_snr

        args, noise_scheduler = self.args, self.scheduler
        vae, text_encoder, unet = models["vae"], models["text_encoder"], models[self.denoiser]

        latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        if args.noise_offset:
            noise += args.noise_offset * torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), device=latents.device
            )
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        ).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
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
        vae, text_encoder = models["vae"], models["text_encoder"]
        device, dtype = vae.device, vae.dtype
        latents = (
            vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist.mean * vae.config.scaling_factor
        )
        size = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (size,), generator=generator)
        input_ids = batch["input_ids"].to(device)
        return {
            self.denoiser: {
                "sample": self.scheduler.add_noise(latents, noise, timesteps),
                "timestep": timesteps.to(device),
                "encoder_hidden_states": text_encoder(input_ids, return_dict=False)[0],
            },
            "text_encoder": {"input_ids": input_ids},
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
        #: each text encoder's tokenizer (``text_encoder_2`` -> ``tokenizer_2``)
        self.tokenizers = {
            name: getattr(pipe, name.replace("text_encoder", "tokenizer"))
            for name in (*self.clip_encoders, self.t5_encoder)
            if name in self.models
        }
        #: T5 tokens per prompt: the pipeline's ``encode_prompt`` default (what inference uses)
        self.max_sequence_length = (
            inspect.signature(pipe.encode_prompt).parameters["max_sequence_length"].default
        )
        vae = self.models["vae"]
        self.shift_factor = vae.config.shift_factor or 0.0
        self.scaling_factor = vae.config.scaling_factor
        self.denoiser_config = self.models[self.denoiser].config

    def default_targets(self) -> list[str]:
        return list(DIT_ATTENTION_TARGETS)

    def fill_defaults(self, args):
        """Also ``--weighting_scheme`` (the family's, as diffusers' script for it has)."""
        super().fill_defaults(args)
        args.weighting_scheme = self.weighting

    def default_resolution(self) -> int:
        """The pipeline's default size: ``sample_size`` latents (128 for SD3 and Flux) x the VAE factor."""
        return self.denoiser_config.get("sample_size", 128) * self.vae_scale

    def loss(self, models, batch, weight_dtype):
        """``mean_b(w(sigma_b) mean((v_theta(x_sigma) - (eps - x0))^2))``."""
        step = self.flow_batch(models, batch, weight_dtype)
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
        vae = models["vae"]
        dist = vae.encode(batch["pixel_values"].to(vae.device, dtype)).latent_dist
        latents = (dist.sample() if generator is None else dist.mean) - self.shift_factor
        latents = latents * self.scaling_factor
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
        text = self.encode_prompt(models, batch["captions"], latents.device)
        inputs = self.transformer_inputs(noisy, timesteps, text)
        return FlowBatch(inputs, self.layout(latents), self.layout(noise), sigmas)

    def token_ids(self, name: str, captions: list[str]) -> torch.Tensor:
        """CLIP: the tokenizer's length (77); T5: ``max_sequence_length``; padded, truncated."""
        tokenizer = self.tokenizers[name]
        if name != self.t5_encoder:
            return tokenize(tokenizer, captions)
        return tokenizer(
            captions,
            max_length=self.max_sequence_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def t5_states(self, models, captions: list[str], device) -> torch.Tensor:
        """The T5 encoder's last hidden states; zeros where the pipeline has no T5 (as it does)."""
        if self.t5_encoder not in models:
            size = (len(captions), self.max_sequence_length, self.denoiser_config.joint_attention_dim)
            return torch.zeros(size, device=device, dtype=models["vae"].dtype)
        ids = self.token_ids(self.t5_encoder, captions).to(device)
        return models[self.t5_encoder](ids)[0]

    @abstractmethod
    def encode_prompt(self, models, captions: list[str], device) -> dict:
        """The transformer's text conditioning (``encoder_hidden_states``, ``pooled_projections``...)."""

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

    def encode_prompt(self, models, captions, device):
        states, pooled = [], []
        for name in self.clip_encoders:
            out = models[name](self.token_ids(name, captions).to(device), output_hidden_states=True)
            pooled.append(out[0])
            states.append(out.hidden_states[-2])
        clip = torch.cat(states, dim=-1)
        t5 = self.t5_states(models, captions, device)
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

    def check_resolution(self, resolution: int) -> None:
        if resolution % (2 * self.vae_scale):
            raise ValueError(
                f"--resolution {resolution} must be a multiple of {2 * self.vae_scale} for Flux "
                f"(latents of {self.vae_scale}x smaller size are packed in 2 x 2 patches)"
            )

    def encode_prompt(self, models, captions, device):
        (name,) = self.clip_encoders
        pooled = models[name](self.token_ids(name, captions).to(device), output_hidden_states=False)
        t5 = self.t5_states(models, captions, device)
        return {
            "encoder_hidden_states": t5,
            "pooled_projections": pooled.pooler_output,
            "txt_ids": torch.zeros(t5.shape[1], 3, device=device, dtype=t5.dtype),
        }

    def transformer_inputs(self, noisy, timesteps, text):
        b, _, h, w = noisy.shape
        inputs = {
            "hidden_states": pack_latents(noisy),
            "timestep": timesteps / 1000,
            "img_ids": latent_image_ids(h // 2, w // 2).to(noisy),
            **text,
        }
        if self.denoiser_config.guidance_embeds:
            inputs["guidance"] = torch.full((b,), self.args.guidance_scale, device=noisy.device)
        return inputs

    def layout(self, latents):
        return pack_latents(latents)


OBJECTIVES: tuple[type[Objective], ...] = (DenoisingObjective, SD3FlowMatching, FluxFlowMatching)


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
        family = pipeline_family(pipe)
        objective_class = next((o for o in OBJECTIVES if family in o.families), None)
        if objective_class is None:
            trained = ", ".join(f.name for o in OBJECTIVES for f in o.families)
            raise ValueError(f"no training objective for {family.name} pipelines (trained: {trained})")
        objective = objective_class(pipe, args)
    except (OSError, ValueError) as err:
        raise ValueError(f"--pretrained_model_name_or_path: cannot load {path}: {_one_line(err)}") from err
    objective.check_flags(args, defaults)
    objective.fill_defaults(args)
    return objective


def real_inputs(
    objective: Objective, models: dict[str, nn.Module], dataset, batch_size: int, seed: int, num: int
) -> dict[str, list[dict]]:
    """``{component: num batches of keyword inputs}`` from the training data (up to 8 images a
    batch, drawn with ``seed``), for calibrating and measuring the merge."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=gen).tolist()
    size = min(batch_size, 8)
    out: dict[str, list[dict]] = {}
    with torch.no_grad():
        for b in range(num):
            idx = [order[(b * size + i) % len(order)] for i in range(size)]
            batch = collate([dataset[(i, seed + i)] for i in idx])
            for name, inputs in objective.model_inputs(models, batch, gen).items():
                out.setdefault(name, []).append(inputs)
    return out


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
