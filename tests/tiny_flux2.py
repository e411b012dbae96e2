"""A tiny FLUX.2 pipeline built from configs (random weights), assembled as
``reslora_diffusers.data.random_pipelines`` assembles its ``flux2`` preset, at sizes no preset
scale reaches: two double and two single blocks 16 wide, a two-level VAE with 4 latent channels,
and a Mistral 3 text encoder 32 wide with the 30 layers whose hidden states the pipeline reads."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, Flux2Pipeline, Flux2Transformer2DModel
from transformers import Mistral3Config, Mistral3ForConditionalGeneration

from reslora_diffusers.data import random_pipelines as rp
from reslora_diffusers.data.tokenizer import add_mistral_chat_format
from tests.tiny_pipes import TEXT_DIM, tiny_tokenizer

#: the VAE's latent channels; the transformer reads them in 2 x 2 patches
LATENT_CHANNELS = 4


def tiny_flux2_transformer(seed: int = 0, double: int = 2, single: int = 2) -> Flux2Transformer2DModel:
    """``double`` double-stream and ``single`` single-stream blocks, 2 heads of 8, guidance embedding."""
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        in_channels=4 * LATENT_CHANNELS,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=rp.FLUX2_TEXT_LAYERS * TEXT_DIM,
        timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=True,
    )


def tiny_flux2_vae(seed: int = 0) -> AutoencoderKLFlux2:
    """Two levels (factor 2), 4 latent channels; batch-norm statistics away from (0, 1), so that
    the latent normalisation shows."""
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
    )
    with torch.no_grad():
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def tiny_mistral3(vocab_size: int, seed: int = 0) -> Mistral3ForConditionalGeneration:
    """Mistral 3 of 30 layers 32 wide (2 query heads, 1 key/value head of 16) and a one-layer
    vision tower."""
    torch.manual_seed(seed)
    text = {
        "vocab_size": vocab_size,
        "hidden_size": TEXT_DIM,
        "intermediate_size": 2 * TEXT_DIM,
        "num_hidden_layers": rp.FLUX2_MIN_TEXT_LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "sliding_window": None,
    }
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision.update(head_dim=8, patch_size=14, image_size=56)
    config = {**rp.mistral3_config(), "text_config": text, "vision_config": vision}
    return Mistral3ForConditionalGeneration(Mistral3Config(**config))


def tiny_flux2_pipeline(tmp: Path, seed: int = 0) -> Flux2Pipeline:
    tok = add_mistral_chat_format(tiny_tokenizer(tmp))
    encoder = tiny_mistral3(len(tok), seed)
    return rp.assemble_flux2_pipeline(tok, tiny_flux2_transformer(seed), tiny_flux2_vae(seed), encoder)
