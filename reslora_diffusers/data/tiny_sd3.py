"""Builders of the tiny diffusion-transformer base (a standard ``StableDiffusion3Pipeline``).

The sibling of :mod:`.tiny_base` for SD3: the same 32 px images, VAE architecture and
vocabulary, with SD3's parts around them. ``scripts/pretrain_tiny_base.py --family sd3``
trains it (starting from the tiny base's trained VAE and text encoder); the tests check a
shipped folder's configs against these functions.

* transformer: :data:`SD3_NUM_LAYERS` joint blocks of width :data:`SD3_WIDTH` (2 heads x 32),
  2 x 2 patches of the 4 x 16 x 16 latents (64 image tokens; ``latent_channels``,
  ``patch_size`` and ``width`` build others: 1 x 1 patches give 256 image tokens, width 128 has
  4 heads);
* VAE: :func:`.tiny_base.build_vae` with a ``shift_factor`` (SD3 decodes ``z / scaling + shift``);
* text: two CLIP encoders with projection (SD3's CLIP-L and CLIP-G roles) of the tiny base's
  text-encoder config, and a one-layer T5 encoder. All three read the project's CLIP-format
  vocabulary: the T5 tokenizer is that CLIP tokenizer, so the T5 sees ``<bos> words <eos>``
  followed by ``<eos>`` padding up to the pipeline's ``max_sequence_length`` (256). The joint
  text sequence is the two CLIPs' penultimate states side by side (2 x 64), zero-padded to the
  T5 width (128), then the 256 T5 states (zero states for a pipeline without T5, as
  ``t5=False`` builds it; :func:`build_silent_t5_encoder` stands in for it in a saved folder);
* scheduler: ``FlowMatchEulerDiscreteScheduler`` with ``shift`` 1 (SD3's 3.0 is for 128 x 128
  latent grids; 16 x 16 latents need no shift toward noise).
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

from ..utils.quiet import loading_pipeline
from .tiny_base import BASE_RESOLUTION, LATENT_CHANNELS, build_text_encoder, build_tokenizer, build_vae

# a pipeline class loads diffusers' pipeline modules, which set off transformers' notice about
# torchvision (reslora_diffusers.utils.quiet.TORCHVISION_FALLBACK): dropped here
with loading_pipeline():
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

#: Joint blocks of the transformer (the last one, as in SD3, updates the image tokens only).
SD3_NUM_LAYERS = 8
_HEADS, _HEAD_DIM = 2, 32
#: Width of the transformer's residual stream (heads x head size).
SD3_WIDTH = _HEADS * _HEAD_DIM
#: Width of each CLIP encoder: the tiny base's text encoder (:func:`.tiny_base.build_text_encoder`).
CLIP_WIDTH = 64
#: Width of the T5 encoder and of the joint text sequence: both CLIP widths side by side.
SD3_TEXT_WIDTH = 2 * CLIP_WIDTH
#: Side of the transformer's patches, in latent pixels.
SD3_PATCH_SIZE = 2
#: Flow-matching ``shift`` of the scheduler (module doc).
SD3_SHIFT = 1.0


def build_sd3_transformer(
    latent_channels: int = LATENT_CHANNELS,
    patch_size: int = SD3_PATCH_SIZE,
    width: int = SD3_WIDTH,
    depth: int = SD3_NUM_LAYERS,
) -> SD3Transformer2DModel:
    """The SD3 (medium) transformer at tiny size: ``depth`` joint blocks, no dual attention, no
    QK norm; heads of 32 channels, as many as ``width`` holds.

    Positions go up to 16 x 16 patches of 2 x 2 latents (32 x 32 of 1 x 1), so images up to
    twice the base resolution can be drawn.
    """
    if width % _HEAD_DIM:
        raise ValueError(f"transformer width {width}: not a multiple of the head size {_HEAD_DIM}")
    return SD3Transformer2DModel(
        sample_size=BASE_RESOLUTION // 2,
        patch_size=patch_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=depth,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=width // _HEAD_DIM,
        joint_attention_dim=SD3_TEXT_WIDTH,
        caption_projection_dim=width,
        pooled_projection_dim=2 * CLIP_WIDTH,
        pos_embed_max_size=BASE_RESOLUTION // patch_size,
    )


def build_sd3_vae(
    scaling_factor: float = 1.0, shift_factor: float = 0.0, latent_channels: int = LATENT_CHANNELS
) -> AutoencoderKL:
    """The tiny base's VAE architecture with SD3's latent normalisation ``(z - shift) * scaling``."""
    vae = build_vae(scaling_factor, latent_channels)
    vae.register_to_config(shift_factor=shift_factor)
    return vae


def build_clip_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    """A CLIP text encoder with projection (SD3 pools both CLIPs' projections) in the tiny base's
    text-encoder config, so that the tiny base's trained weights load into it."""
    return CLIPTextModelWithProjection(build_text_encoder(tokenizer).config)


def build_t5_encoder(tokenizer: CLIPTokenizer) -> T5EncoderModel:
    """One gated-GELU T5 v1.1 layer (as SD3's T5-XXL) of width :data:`SD3_TEXT_WIDTH` over our vocabulary."""
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=SD3_TEXT_WIDTH,
            d_kv=32,
            d_ff=SD3_TEXT_WIDTH,
            num_layers=1,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def build_silent_t5_encoder(tokenizer: CLIPTokenizer) -> T5EncoderModel:
    """:func:`build_t5_encoder` with every weight zero, so that its states are zero whatever the
    prompt (its final RMS norm scales by 0): the ``text_encoder_3`` of a base trained without T5.
    diffusers' ``StableDiffusion3Pipeline.from_pretrained`` loads a folder only with one, and with
    it the pipeline computes what it computes without T5 (zero T5 states)."""
    encoder = build_t5_encoder(tokenizer)
    for parameter in encoder.parameters():
        parameter.data.zero_()
    return encoder


def build_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """1000 training steps, ``shift`` :data:`SD3_SHIFT`, no dynamic shifting."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_SHIFT)


def build_sd3_pipeline(
    tokenizer_dir: str | Path,
    vae_scaling_factor: float = 1.0,
    vae_shift_factor: float = 0.0,
    latent_channels: int = LATENT_CHANNELS,
    extra_words: tuple[str, ...] = (),
    patch_size: int = SD3_PATCH_SIZE,
    t5: bool = True,
    width: int = SD3_WIDTH,
    depth: int = SD3_NUM_LAYERS,
) -> StableDiffusion3Pipeline:
    """The untrained tiny SD3 pipeline; tokenizer files of our vocabulary and ``extra_words``
    written to ``tokenizer_dir`` (one tokenizer object serves all three encoders). Without ``t5``
    it has no ``text_encoder_3``, as SD3 can run: the pipeline then pads each prompt's CLIP states
    with ``max_sequence_length`` zero states instead of the T5's."""
    tokenizer = build_tokenizer(tokenizer_dir, extra_words)
    return StableDiffusion3Pipeline(
        transformer=build_sd3_transformer(latent_channels, patch_size, width, depth),
        scheduler=build_flow_scheduler(),
        vae=build_sd3_vae(vae_scaling_factor, vae_shift_factor, latent_channels),
        text_encoder=build_clip_encoder(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=build_clip_encoder(tokenizer),
        tokenizer_2=tokenizer,
        text_encoder_3=build_t5_encoder(tokenizer) if t5 else None,
        tokenizer_3=tokenizer if t5 else None,
    )
