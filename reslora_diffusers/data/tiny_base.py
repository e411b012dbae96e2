"""Builders of the tiny text-to-image base (a standard ``StableDiffusionPipeline``).

``scripts/pretrain_tiny_base.py`` trains these models; the test suite checks that the
committed pipeline's configs equal what these functions build.
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..utils.quiet import loading_pipeline
from .shapes import RESOLUTION
from .tokenizer import MODEL_MAX_LENGTH, vocabulary_words, write_tokenizer

# a pipeline class loads diffusers' pipeline modules, which set off transformers' notice about
# torchvision (reslora_diffusers.utils.quiet.TORCHVISION_FALLBACK): dropped here
with loading_pipeline():
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

#: Image side in pixels that the base generates (latents are half of it).
BASE_RESOLUTION = RESOLUTION
#: How much the shipped base's VAE downsamples (diffusers' ``vae_scale_factor``); the pretraining
#: script's ``--vae-scale-factor 1`` builds a one-level VAE whose latents keep the image's side.
VAE_SCALE_FACTOR = 2
#: Inference steps and classifier-free guidance at which the base is documented and evaluated.
BASE_NUM_INFERENCE_STEPS = 20
BASE_GUIDANCE_SCALE = 4.0
#: A base's bar on the open-set reading: the lowest prompt accuracy on its held-out and its seen
#: colour x shape pairs (the model card's sets and ``scripts/read_base.py``'s fresh seeds).
BASE_ACCURACY_BAR = {"heldout": 0.90, "seen": 0.95}

_VAE_CHANNELS = (32, 64)
_TEXT_HIDDEN = 64
#: Channels of the shipped base's latents; ``scripts/pretrain_tiny_base.py --latent-channels``
#: builds others (8 measured in ``scripts/pretrain_state/README.md``: hardly sharper at 6000 steps).
LATENT_CHANNELS = 4
#: The shipped UNet's widths at its two levels; ``--unet-channels`` of the pretraining script builds
#: others, each a multiple of the UNet's group-norm groups.
UNET_CHANNELS = (32, 64)
UNET_NORM_GROUPS = 16


def build_tokenizer(out_dir: str | Path, extra_words: tuple[str, ...] = ()) -> CLIPTokenizer:
    """Write our vocabulary (with ``extra_words``, e.g. pretraining-only colours, each one token
    too) into ``out_dir`` and load it as a ``CLIPTokenizer``."""
    return CLIPTokenizer.from_pretrained(write_tokenizer(out_dir, vocabulary_words(extra_words)))


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer, 64-wide CLIP text encoder over ``tokenizer``'s vocabulary."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=4 * _TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=_TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _check_scale_factor(vae_scale_factor: int) -> None:
    if vae_scale_factor not in (1, 2):
        raise ValueError(f"vae_scale_factor {vae_scale_factor}: the tiny base's VAE downsamples by 1 or 2")


def build_vae(
    scaling_factor: float = 1.0,
    latent_channels: int = LATENT_CHANNELS,
    vae_scale_factor: int = VAE_SCALE_FACTOR,
) -> AutoencoderKL:
    """A VAE of ``log2(vae_scale_factor) + 1`` levels: 3 x 32 x 32 images <-> ``latent_channels`` x
    (32 / ``vae_scale_factor``)^2 latents (2 levels and 16 x 16 latents by default).
    ``scaling_factor`` is the latents' normalisation, not the downsampling."""
    _check_scale_factor(vae_scale_factor)
    channels = _VAE_CHANNELS[: vae_scale_factor.bit_length()]
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=16,
        sample_size=BASE_RESOLUTION,
        scaling_factor=scaling_factor,
    )


def build_unet(
    latent_channels: int = LATENT_CHANNELS,
    block_out_channels: tuple[int, int] = UNET_CHANNELS,
    vae_scale_factor: int = VAE_SCALE_FACTOR,
) -> UNet2DConditionModel:
    """A 2-level UNet with cross-attention at every level (2 transformer blocks per down level),
    ``block_out_channels`` wide at its two levels (multiples of ``UNET_NORM_GROUPS``), for the
    latents of a VAE that downsamples by ``vae_scale_factor``.

    With ``vae_scale_factor`` 1 (32 x 32 latents) a first level without attention, as wide as the
    next, runs at the latents' side ahead of those two, as SDXL's first level does: with
    self-attention over its 1024 positions a forward and backward pass cost 7x the 16 x 16 UNet's,
    this layout 1.2x (one thread, batch 32).
    """
    _check_scale_factor(vae_scale_factor)
    down = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    widths = tuple(block_out_channels)
    if vae_scale_factor == 1:
        down, up, widths = ("DownBlock2D", *down), (*up, "UpBlock2D"), (widths[0], *widths)
    return UNet2DConditionModel(
        sample_size=BASE_RESOLUTION // vae_scale_factor,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=widths,
        layers_per_block=2,
        norm_num_groups=UNET_NORM_GROUPS,
        cross_attention_dim=_TEXT_HIDDEN,
        attention_head_dim=2,
    )


def build_scheduler() -> DPMSolverMultistepScheduler:
    """DPM-Solver++ over a 1000-step linear-beta DDPM schedule (v-prediction), sampling from t = 999."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=1,
    )


def build_pipeline(
    tokenizer_dir: str | Path,
    vae_scaling_factor: float = 1.0,
    latent_channels: int = LATENT_CHANNELS,
    unet_channels: tuple[int, int] = UNET_CHANNELS,
    vae_scale_factor: int = VAE_SCALE_FACTOR,
    extra_words: tuple[str, ...] = (),
) -> StableDiffusionPipeline:
    """The untrained base pipeline (no safety checker), tokenizer files written to ``tokenizer_dir``
    (our vocabulary and ``extra_words``)."""
    tokenizer = build_tokenizer(tokenizer_dir, extra_words)
    return StableDiffusionPipeline(
        vae=build_vae(vae_scaling_factor, latent_channels, vae_scale_factor),
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=build_unet(latent_channels, unet_channels, vae_scale_factor),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
