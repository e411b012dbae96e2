"""The rectified-flow objective of diffusion transformers (SD3, Flux), as diffusers' SD3/Flux
LoRA scripts train it.

With clean latents ``x0``, noise ``eps`` and ``sigma`` in [0, 1]:

    x_sigma = (1 - sigma) x0 + sigma eps        target = eps - x0
    loss    = mean_b( w(sigma_b) * mean((v_theta(x_sigma, sigma) - target)^2) )

``sigma`` is drawn through ``u`` (the weighting scheme's density over [0, 1]) and the
scheduler's discrete sigmas (``u * num_train_timesteps`` picks the index), so training sees
the shifted schedule that sampling uses:

* ``logit_normal``: ``u = sigmoid(N(logit_mean, logit_std))``;
* ``mode``: ``u = 1 - v - mode_scale (cos^2(pi v / 2) - 1 + v)``, ``v ~ U(0, 1)``;
* otherwise ``u ~ U(0, 1)``.

Loss weights ``w``: ``sigma_sqrt``: ``sigma^-2``; ``cosmap``: ``2 / (pi (1 - 2 sigma + 2 sigma^2))``;
``logit_normal``, ``mode``, ``none``: 1.

:class:`FlowMatchingObjective` trains a transformer with it; a family file subclasses it with
the family's prompt encoding and input layout (:mod:`reslora_diffusers.frontends.sd3`,
:mod:`~reslora_diffusers.frontends.flux`): VAE latents ``(z - shift_factor) * scaling_factor``,
prompts through the pipeline's CLIP and T5 encoders as its ``encode_prompt`` does (the same
states, checked in the tests; written out because a trained encoder runs wrapped by DDP, which
``encode_prompt`` cannot call).
"""

from __future__ import annotations

import argparse
import inspect
import math
from abc import abstractmethod
from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import Objective

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


def sample_u(
    scheme: str,
    batch: int,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``u`` in [0, 1] per sample, by the density of ``scheme`` (module doc)."""
    check_scheme(scheme)
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, size=(batch,), generator=generator))
    v = torch.rand(batch, generator=generator)
    if scheme == "mode":
        return 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    return v


def sample_sigmas(scheduler, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps, sigmas)`` of a ``FlowMatchEulerDiscreteScheduler`` at indices ``u * N``."""
    n = scheduler.config.num_train_timesteps
    index = (u * n).long().clamp(0, len(scheduler.timesteps) - 1)
    return scheduler.timesteps[index], scheduler.sigmas[index]


def dynamic_shift_mu(scheduler, image_seq_len: int) -> float:
    """The pipelines' ``mu`` for an image of ``image_seq_len`` tokens: linear from ``base_shift``
    at ``base_image_seq_len`` tokens to ``max_shift`` at ``max_image_seq_len`` (scheduler config)."""
    c = scheduler.config
    slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
    return c.base_shift + slope * (image_seq_len - c.base_image_seq_len)


def shifted_scheduler(scheduler, image_seq_len: int):
    """A copy of a dynamically shifting ``FlowMatchEulerDiscreteScheduler`` whose discrete sigmas
    are those its ``set_timesteps`` gives with ``num_train_timesteps`` steps at the ``mu`` of
    ``image_seq_len`` tokens (:func:`dynamic_shift_mu`): ``time_shift(mu, 1, sigma)`` of the
    unshifted sigmas ``1 .. 1/N``, stretched to ``shift_terminal`` where the config has one, as the
    pipelines sample at that image size."""
    shifted = type(scheduler).from_config(scheduler.config)
    shifted.set_timesteps(scheduler.config.num_train_timesteps, mu=dynamic_shift_mu(scheduler, image_seq_len))
    return shifted


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """``w(sigma)`` of ``scheme`` (module doc)."""
    check_scheme(scheme)
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def t5_sequence_length(pipe) -> int:
    """The T5 tokens of each prompt the pipeline encodes by default (its ``encode_prompt``'s
    ``max_sequence_length``: 256 for SD3), padded in as zero states where it has no T5."""
    return inspect.signature(pipe.encode_prompt).parameters["max_sequence_length"].default


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) x0 + sigma eps``, ``sigma`` broadcast over the sample's dimensions."""
    s = sigmas.reshape(-1, *[1] * (latents.ndim - 1)).to(latents.dtype)
    return (1 - s) * latents + s * noise


def flow_matching_loss(
    pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, scheme: str
) -> torch.Tensor:
    """``mean_b(w(sigma_b) mean((pred - (eps - x0))^2))`` in float32."""
    err = (pred.float() - (noise - latents).float()) ** 2
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    return (loss_weights(scheme, sigmas).to(per_sample) * per_sample).mean()


def check_scheme(scheme: str) -> None:
    if scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme {scheme!r} is invalid; allowed: {' | '.join(WEIGHTING_SCHEMES)}")


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
    """A diffusion transformer's rectified-flow objective (module doc). Subclasses name their
    CLIP and T5 encoders, encode the prompts (:meth:`encode_text`) and lay out the transformer's
    inputs (:meth:`transformer_inputs`, :meth:`layout`)."""

    denoiser_title = "transformer"
    unused_flags = ("snr_gamma", "noise_offset", "prediction_type")
    #: the ``--weighting_scheme`` of diffusers' LoRA script for the family
    default_weighting = "none"
    #: the pipeline's CLIP encoders and its T5 encoder, by component name
    clip_encoders: tuple[str, ...] = ()
    t5_encoder = ""

    def __init__(self, pipe, args: argparse.Namespace, family) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(pipe, args, family)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.weighting = args.weighting_scheme or self.default_weighting
        #: T5 tokens per prompt: the pipeline's ``encode_prompt`` default (what inference uses)
        self.max_sequence_length = t5_sequence_length(pipe)
        self.denoiser_config = self.models[self.denoiser].config

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
        schedule = self.training_scheduler(latents)
        timesteps, sigmas = (t.to(latents.device) for t in sample_sigmas(schedule, u))
        noisy = noisy_latents(latents, noise, sigmas)
        inputs = self.transformer_inputs(noisy, timesteps, text)
        return FlowBatch(inputs, self.layout(latents), self.layout(noise), sigmas)

    def training_scheduler(self, latents: torch.Tensor):
        """The scheduler whose discrete sigmas training draws from for clean ``latents``
        ``(B, C, H, W)``: the pipeline's own, its static ``shift`` already in its sigmas (a family
        that shifts by the image size, as its pipeline does, returns :func:`shifted_scheduler`)."""
        return self.scheduler

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
