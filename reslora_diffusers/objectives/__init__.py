"""Training objectives: the contract a diffusion family's objective fulfils and the losses the
families share. A family file of :mod:`reslora_diffusers.frontends` declares its objective, a
subclass of one of these with the family's prompt encoding and inputs.

* :mod:`.base`: the :class:`Objective` contract (VAE posterior, caches, image sizes, the loss of a batch);
* :mod:`.denoising`: DDPM (epsilon / v-prediction, min-SNR weights) for UNets;
* :mod:`.flow_matching`: rectified flow (weighting schemes) for diffusion transformers.

Importing this package imports no diffusers (the objectives load it when they are built).
"""

from .base import AUTO_BUCKET_STEP, Objective, tokenize
from .denoising import DenoisingObjective, denoising_loss, denoising_target, min_snr_weights, snr
from .flow_matching import (
    WEIGHTING_SCHEMES,
    FlowBatch,
    FlowMatchingObjective,
    dynamic_shift_mu,
    flow_matching_loss,
    loss_weights,
    noisy_latents,
    sample_sigmas,
    sample_u,
    shifted_scheduler,
    t5_sequence_length,
)

__all__ = [
    "AUTO_BUCKET_STEP",
    "WEIGHTING_SCHEMES",
    "DenoisingObjective",
    "FlowBatch",
    "FlowMatchingObjective",
    "Objective",
    "denoising_loss",
    "denoising_target",
    "dynamic_shift_mu",
    "flow_matching_loss",
    "loss_weights",
    "min_snr_weights",
    "noisy_latents",
    "sample_sigmas",
    "sample_u",
    "shifted_scheduler",
    "snr",
    "t5_sequence_length",
    "tokenize",
]
