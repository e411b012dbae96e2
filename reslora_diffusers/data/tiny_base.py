"""Builders of the tiny text-to-image base (a standard ``StableDiffusionPipeline``).

``scripts/pretrain_tiny_base.py`` trains these models; the test suite checks that the
committed pipeline's configs equal what these functions build.
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..utils.quiet import loading_pipeline
from .shapes import RESOLUTION
from .tokenizer import MODEL_MAX_LENGTH, write_tokenizer

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
#: Inference steps and classifier-free guidance at which the base is documented and evaluated.
BASE_NUM_INFERENCE_STEPS = 20
BASE_GUIDANCE_SCALE = 4.0

_VAE_CHANNELS = (32, 64)
_TEXT_HIDDEN = 64
#: Channels of the shipped base's latents; ``scripts/pretrain_tiny_base.py --latent-channels``
#: builds others (8 measured in ``scripts/pretrain_state/README.md``: hardly sharper at 6000 steps).
LATENT_CHANNELS = 4
#: The shipped UNet's widths at its two levels; ``--unet-channels`` of the pretraining script builds
#: others, each a multiple of the UNet's group-norm groups.
UNET_CHANNELS = (32, 64)
UNET_NORM_GROUPS = 16


def build_tokenizer(out_dir: str | Path) -> CLIPTokenizer:
    """Write our vocabulary into ``out_dir`` and load it as a ``CLIPTokenizer``."""
    return CLIPTokenizer.from_pretrained(write_tokenizer(out_dir))


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


def build_vae(scaling_factor: float = 1.0, latent_channels: int = LATENT_CHANNELS) -> AutoencoderKL:
    """A 2-level VAE: 3 x 32 x 32 images <-> ``latent_channels`` x 16 x 16 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(_VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(_VAE_CHANNELS),
        block_out_channels=_VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=16,
        sample_size=BASE_RESOLUTION,
        scaling_factor=scaling_factor,
    )


def build_unet(
    latent_channels: int = LATENT_CHANNELS, block_out_channels: tuple[int, int] = UNET_CHANNELS
) -> UNet2DConditionModel:
    """A 2-level UNet with cross-attention at every level (2 transformer blocks per down level),
    ``block_out_channels`` wide at its two levels (multiples of ``UNET_NORM_GROUPS``)."""
    return UNet2DConditionModel(
        sample_size=BASE_RESOLUTION // 2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=block_out_channels,
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
) -> StableDiffusionPipeline:
    """The untrained base pipeline (no safety checker), tokenizer files written to ``tokenizer_dir``."""
    tokenizer = build_tokenizer(tokenizer_dir)
    return StableDiffusionPipeline(
        vae=build_vae(vae_scaling_factor, latent_channels),
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=build_unet(latent_channels, unet_channels),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
