"""Tiny Qwen-Image and Z-Image transformers and pipelines built from configs (random weights),
assembled as ``reslora_diffusers.data.random_pipelines`` assembles its presets (``qwen-image``,
``z-image``) at sizes no preset scale reaches: 32-wide Qwen2.5-VL and Qwen3 text encoders with our
vocabulary as a Qwen2 tokenizer, Qwen-Image's video VAE at two levels, the tiny VAE for Z-Image."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)

from reslora_diffusers.data.qwen_tokenizer import qwen_tokenizer
from reslora_diffusers.data.random_pipelines import assemble_pipeline, qwen2_5_vl_encoder, qwen3_encoder
from tests.tiny_dits import dit_vae
from tests.tiny_pipes import TEXT_DIM

#: the tiny video VAE's latent channels and their normalisation (not 0 and 1, so that it shows)
QWEN_LATENT_CHANNELS = 4
QWEN_LATENTS_MEAN = (0.1, -0.2, 0.3, 0.0)
QWEN_LATENTS_STD = (1.5, 0.5, 2.0, 1.0)


def tiny_qwen_image_transformer(seed: int = 0) -> QwenImageTransformer2DModel:
    """Three dual-stream blocks of width 16 (2 heads x 8), 2 x 2 patches of 4 latent channels."""
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * QWEN_LATENT_CHANNELS,
        out_channels=QWEN_LATENT_CHANNELS,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(2, 2, 4),
    )


def tiny_qwen_vae(seed: int = 0) -> AutoencoderKLQwenImage:
    """Qwen-Image's causal video VAE at two levels (2x smaller latents)."""
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=QWEN_LATENT_CHANNELS,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=list(QWEN_LATENTS_MEAN),
        latents_std=list(QWEN_LATENTS_STD),
    )


def tiny_qwen_image_pipeline(seed: int = 0) -> QwenImagePipeline:
    """The transformer, video VAE and a two-layer Qwen2.5-VL (one vision block), with Qwen-Image's
    published scheduler (dynamic shifting)."""
    tok = qwen_tokenizer()
    torch.manual_seed(seed)
    text = {
        "hidden_size": TEXT_DIM,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 2048,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    }
    vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": TEXT_DIM,
    }
    encoder = qwen2_5_vl_encoder(
        {"text_config": text, "vision_config": {**vision, "fullatt_block_indexes": [0]}}, tok
    )
    return assemble_pipeline(
        "qwen-image", tok, tiny_qwen_image_transformer(seed), tiny_qwen_vae(seed), [encoder]
    )


def tiny_z_image_transformer(seed: int = 0) -> ZImageTransformer2DModel:
    """Two noise and two context refiner blocks and three main blocks of width 16 (2 heads x 8)."""
    torch.manual_seed(seed)
    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=16,
        n_layers=3,
        n_refiner_layers=2,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=TEXT_DIM,
        axes_dims=[2, 2, 4],
        axes_lens=[1536, 32, 32],
    )


def tiny_z_image_pipeline(seed: int = 0) -> ZImagePipeline:
    """The transformer, the tiny VAE with Flux's latent constants and a two-layer Qwen3, with
    Z-Image's published scheduler (shift 3)."""
    tok = qwen_tokenizer()
    torch.manual_seed(seed)
    config = {
        "hidden_size": TEXT_DIM,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 1024,
    }
    encoder = qwen3_encoder(config, tok)
    return assemble_pipeline("z-image", tok, tiny_z_image_transformer(seed), dit_vae(seed), [encoder])
