"""The flow-matching objective of SD3/Flux and Flux's latent packing, against diffusers' own."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from reslora_diffusers import ResLoRAConfig, add_reslora, trainable_parameters
from reslora_diffusers.frontends.flux import latent_image_ids, pack_latents
from reslora_diffusers.objectives.flow_matching import (
    WEIGHTING_SCHEMES,
    flow_matching_loss,
    loss_weights,
    noisy_latents,
    sample_sigmas,
    sample_u,
)
from tests.tiny_dits import tiny_flux_transformer


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_density_and_weights_match_diffusers_training_utils(scheme):
    kwargs = {"logit_mean": 0.3, "logit_std": 1.2, "mode_scale": 1.29}
    ours = sample_u(scheme, 64, generator=torch.Generator().manual_seed(0), **kwargs)
    theirs = compute_density_for_timestep_sampling(
        scheme, 64, generator=torch.Generator().manual_seed(0), **kwargs
    )
    torch.testing.assert_close(ours, theirs)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    timesteps, sigmas = sample_sigmas(scheduler, ours)
    # the sigma of a timestep is the shifted schedule's: t = 1000 sigma
    torch.testing.assert_close(timesteps, sigmas * 1000)
    torch.testing.assert_close(loss_weights(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas))


def test_bad_scheme_is_named():
    with pytest.raises(ValueError, match="weighting_scheme 'uniform' is invalid"):
        sample_u("uniform", 2)


def test_loss_written_out():
    gen = torch.Generator().manual_seed(0)
    x0, eps, pred = (torch.randn(3, 4, 2, 2, generator=gen) for _ in range(3))
    sigmas = torch.tensor([0.2, 0.5, 0.9])
    noisy = noisy_latents(x0, eps, sigmas)
    torch.testing.assert_close(noisy[1], 0.5 * x0[1] + 0.5 * eps[1])
    want = sum((1 / sigmas[b] ** 2) * ((pred[b] - (eps[b] - x0[b])) ** 2).mean() for b in range(3)) / 3
    torch.testing.assert_close(flow_matching_loss(pred, x0, eps, sigmas, "sigma_sqrt"), want)


def test_flux_packing_matches_the_pipeline():
    latents = torch.randn(2, 4, 6, 8)
    torch.testing.assert_close(pack_latents(latents), FluxPipeline._pack_latents(latents, 2, 4, 6, 8))
    torch.testing.assert_close(
        latent_image_ids(3, 4), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    )
    with pytest.raises(ValueError, match="must be even"):
        pack_latents(torch.randn(1, 4, 5, 8))


def test_flow_matching_steps_train_a_flux_transformer_with_reslora():
    model = tiny_flux_transformer()
    add_reslora(model, ResLoRAConfig(rank=4, res_type="bs", pre_num=2))
    opt = torch.optim.AdamW(trainable_parameters(model), lr=3e-2)
    gen = torch.Generator().manual_seed(0)
    x0 = pack_latents(torch.randn(2, 4, 8, 8, generator=gen))  # 16 tokens of 16 features
    text = {
        "encoder_hidden_states": torch.randn(2, 5, 32, generator=gen),
        "pooled_projections": torch.randn(2, 32, generator=gen),
    }
    ids = {"img_ids": latent_image_ids(4, 4), "txt_ids": torch.zeros(5, 3)}
    # one fixed noisy sample: the steps must fit it (fresh noise would hide progress in 20 steps)
    eps = torch.randn(x0.shape, generator=gen)
    _, sigmas = sample_sigmas(FlowMatchEulerDiscreteScheduler(), sample_u("logit_normal", 2, generator=gen))
    losses = []
    for _ in range(20):
        pred = model(
            hidden_states=noisy_latents(x0, eps, sigmas),
            timestep=sigmas,
            guidance=torch.full((2,), 3.5),
            **text,
            **ids,
        ).sample
        loss = flow_matching_loss(pred, x0, eps, sigmas, "none")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0]
