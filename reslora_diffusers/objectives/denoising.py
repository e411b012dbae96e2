"""The DDPM denoising objective of Stable Diffusion UNets, as diffusers' LoRA scripts train it.

With clean latents ``x0``, noise ``eps``, a timestep ``t`` uniform in ``[0, T)`` and the
scheduler's ``abar_t`` (``alphas_cumprod``):

    x_t    = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    target = eps                                          (epsilon prediction)
           = sqrt(abar_t) eps - sqrt(1 - abar_t) x0       (v-prediction)
    snr_t  = abar_t / (1 - abar_t)
    loss   = mean((pred - target)^2)                                  (gamma = 0)
           = mean_b( w_b mean((pred_b - target_b)^2) ),  w = min(snr, gamma) / snr        (eps)
                                                         w = min(snr, gamma) / (snr + 1)  (v)

the min-SNR weighting of Hang et al. 2023 (diffusers' ``--snr_gamma``). :class:`DenoisingObjective`
trains a UNet with it; a family file subclasses it with the family's prompt encoding and
conditioning (:mod:`reslora_diffusers.frontends.sd`, :mod:`~reslora_diffusers.frontends.sdxl`).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .base import Objective


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``snr_t = (sqrt(abar_t) / sqrt(1 - abar_t))^2`` in float32, computed as diffusers'
    ``compute_snr`` does (the same rounding)."""
    alpha = (alphas_cumprod**0.5).to(timesteps.device)[timesteps].float()
    sigma = ((1.0 - alphas_cumprod) ** 0.5).to(timesteps.device)[timesteps].float()
    return (alpha / sigma) ** 2


def denoising_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """``eps``, or ``v`` when the scheduler's ``prediction_type`` is ``v_prediction``."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """``min(snr, gamma) / snr`` (epsilon) or ``min(snr, gamma) / (snr + 1)`` (v-prediction)."""
    clipped = snr_t.clamp(max=gamma)
    return clipped / snr_t if prediction_type == "epsilon" else clipped / (snr_t + 1)


def denoising_loss(
    pred: torch.Tensor, target: torch.Tensor, scheduler, timesteps: torch.Tensor, snr_gamma: float = 0.0
) -> torch.Tensor:
    """The module doc's loss in float32: the plain mean squared error, or with ``snr_gamma`` > 0
    each sample's mean error weighted by :func:`min_snr_weights` of its timestep."""
    if not snr_gamma:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    weights = min_snr_weights(
        snr(scheduler.alphas_cumprod, timesteps), snr_gamma, scheduler.config.prediction_type
    )
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(
        dim=tuple(range(1, pred.ndim))
    )
    return (per_sample * weights.to(per_sample)).mean()


class DenoisingObjective(Objective):
    """A UNet's DDPM objective (module doc): the pipeline's ``DDPMScheduler`` noise at uniform
    timesteps, target ``eps`` or ``v``, min-SNR weights when ``--snr_gamma`` > 0. Subclasses
    encode the prompts (:meth:`encode_text`) and may add conditioning (:meth:`unet_conditioning`)."""

    denoiser_title = "UNet"
    unused_flags = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale")

    def __init__(self, pipe, args: argparse.Namespace, family) -> None:
        from diffusers import DDPMScheduler

        super().__init__(pipe, args, family)
        self.scheduler = DDPMScheduler.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision
        )
        if args.prediction_type is not None:
            self.scheduler.register_to_config(prediction_type=args.prediction_type)

    def default_resolution(self) -> int:
        return self.models[self.denoiser].config.sample_size * self.vae_scale

    def latent_multiple(self) -> int:
        """``2**(levels - 1)``: the UNet halves the latents at every level but the last."""
        return 2 ** (len(self.models[self.denoiser].config.block_out_channels) - 1)

    def side_reason(self) -> str:
        return f"the VAE's factor {self.vae_scale} x the UNet's {self.latent_multiple()}x downsampling"

    def unet_conditioning(self, text: dict[str, torch.Tensor], batch: dict) -> dict:
        """The UNet's keyword inputs beside the noisy latents and timesteps (default: the text
        inputs of :meth:`encode_text` as they are)."""
        return dict(text)

    def latent_loss(self, models, latents, text, batch):
        """The module doc's loss at uniform timesteps, with ``--noise_offset`` added to the noise."""
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
        target = denoising_target(noise_scheduler, latents, noise, timesteps)
        unet = models[self.denoiser]
        pred = unet(noisy, timesteps, **self.unet_conditioning(text, batch), return_dict=False)[0]
        return denoising_loss(pred, target, noise_scheduler, timesteps, args.snr_gamma)

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
