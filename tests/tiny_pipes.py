"""Tiny Stable Diffusion 1.x and SDXL pipelines built from configs (random weights)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from reslora_diffusers.data.tokenizer import write_tokenizer

TEXT_DIM = 32


def tiny_sd_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD 1.x layout: cross-attention at two resolution levels and in the mid block."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL layout: no attention at the first level, 2 transformer layers at the second,
    linear projections, text_time added conditioning."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * TEXT_DIM,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM,
        norm_num_groups=8,
    )


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
    )


def tiny_clip_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=TEXT_DIM,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def tiny_tokenizer(tmp: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp / "tokenizer")))


def tiny_sd_pipeline(tmp: Path, seed: int = 0) -> StableDiffusionPipeline:
    tok = tiny_tokenizer(tmp)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_config(len(tok)))
    return StableDiffusionPipeline(
        unet=tiny_sd_unet(seed),
        vae=tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tok,
        scheduler=EulerDiscreteScheduler(steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(tmp: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    tok = tiny_tokenizer(tmp)
    torch.manual_seed(seed)
    te1 = CLIPTextModel(tiny_clip_config(len(tok)))
    te2 = CLIPTextModelWithProjection(tiny_clip_config(len(tok)))
    return StableDiffusionXLPipeline(
        unet=tiny_sdxl_unet(seed),
        vae=tiny_vae(seed),
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok,
        scheduler=EulerDiscreteScheduler(steps_offset=1),
    )


def unet_inputs(unet: UNet2DConditionModel, batch: int = 2, seed: int = 0) -> dict:
    """One UNet call's keyword arguments (SDXL's added conditioning where needed)."""
    gen = torch.Generator().manual_seed(seed)
    kwargs = {
        "sample": torch.randn(batch, 4, 8, 8, generator=gen),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen),
        "encoder_hidden_states": torch.randn(batch, 7, unet.config.cross_attention_dim, generator=gen),
    }
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, TEXT_DIM, generator=gen),
            "time_ids": torch.rand(batch, 6, generator=gen) * 64,
        }
    return kwargs
