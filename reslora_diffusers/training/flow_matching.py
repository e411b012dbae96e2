"""The rectified-flow objective of SD3 and Flux, as diffusers' SD3/Flux LoRA scripts train it.

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
"""

from __future__ import annotations

import math

import torch

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


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """``w(sigma)`` of ``scheme`` (module doc)."""
    check_scheme(scheme)
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


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
