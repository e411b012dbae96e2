"""The DDPM objective's loss (objectives/denoising.py), the one the training script and the
pretraining script share, against diffusers' own SNR and the min-SNR formula written out."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from reslora_diffusers.objectives import denoising_loss, denoising_target, snr


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_loss_is_the_written_out_min_snr_formula(prediction_type, gamma):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    gen = torch.Generator().manual_seed(0)
    x0, eps, pred = (torch.randn(4, 4, 3, 3, generator=gen) for _ in range(3))
    t = torch.tensor([0, 10, 500, 999])
    abar = scheduler.alphas_cumprod[t].view(4, 1, 1, 1)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    target = eps if prediction_type == "epsilon" else v
    torch.testing.assert_close(denoising_target(scheduler, x0, eps, t), target)
    assert torch.equal(snr(scheduler.alphas_cumprod, t), compute_snr(scheduler, t))
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    if gamma:
        ratio = (abar / (1 - abar)).flatten()
        weights = torch.minimum(ratio, torch.full_like(ratio, gamma))
        weights = weights / ratio if prediction_type == "epsilon" else weights / (ratio + 1)
        want = (weights * per_sample).mean()
    else:
        want = per_sample.mean()
    torch.testing.assert_close(denoising_loss(pred, target, scheduler, t, gamma), want)
