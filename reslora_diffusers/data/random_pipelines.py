"""Pipelines with random weights in the published architectures: SD 1.5, SDXL, SD3 medium, Flux dev,
Qwen-Image, Z-Image, FLUX.2 [dev] and Wan 2.1 text-to-video 14B.

The numbers are those of the published model configs (``unet/config.json``,
``transformer/config.json``, ``vae/config.json``, the text encoders' ``config.json``), written
out here so that a full-size pipeline exists without a download; the training script and the
benchmarks can then be timed at the real sizes. ``scale`` shrinks them for CPU runs:

* widths: channel counts ``c`` become ``max(g, round(c * scale / g) * g)`` (``g`` = the group
  norm's groups: 32 at ``scale >= 0.25``, else 8); attention heads become
  ``max(1, round(heads * scale))`` at the published head size (SDXL: heads = width / 64);
* depths: transformer layers per block, joint / double / single blocks and text-encoder
  layers become ``max(1, round(n * scale))`` (SD3: at least 2 joint blocks, since its last
  one differs); resnet layers per block and the number of resolution levels stay.

Every text encoder uses the project's own CLIP-format tokenizer (:func:`.tokenizer.write_tokenizer`);
the T5 encoder is a one-layer T5 of the transformer's ``joint_attention_dim`` width with that
tokenizer standing in for T5's (the pipelines only need its output width). Qwen-Image's and
Z-Image's text encoders (Qwen2.5-VL-7B, Qwen3-4B) are theirs at the scaled size, with our
vocabulary as a Qwen2 tokenizer (:func:`.qwen_tokenizer.qwen_tokenizer`): Qwen-Image's prompt
template and Z-Image's chat template need that tokenizer class and layout.

FLUX.2 and Wan have their text encoders in full (Mistral Small 3.x, UMT5-XXL: their widths and
depths scale like the others', their vocabularies are our tokenizer's), since their states are
the transformer's text input; Mistral keeps at least 30 layers, because ``Flux2Pipeline`` reads
its hidden states 10, 20 and 30. FLUX.2's tokenizer is ours with Mistral's chat format
(:func:`.tokenizer.add_mistral_chat_format`; the released ``PixtralProcessor`` needs torchvision,
and the pipeline encodes prompts through any tokenizer's ``apply_chat_template``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

PRESETS = ("sd15", "sdxl", "sd3", "flux", "qwen-image", "z-image", "flux2", "wan")


@dataclass(frozen=True)
class Scale:
    """Rounding rules for one ``scale`` factor (see the module doc)."""

    factor: float

    @property
    def groups(self) -> int:
        return 32 if self.factor >= 0.25 else 8

    def width(self, c: int) -> int:
        return max(self.groups, round(c * self.factor / self.groups) * self.groups)

    def count(self, n: int, least: int = 1) -> int:
        return max(least, round(n * self.factor))


def _check_scale(scale: float) -> Scale:
    if not 0 < scale <= 1:
        raise ValueError(f"scale {scale} must be in (0, 1]")
    return Scale(scale)


# ----------------------------------------------------------------------------- UNets


def sd15_unet_config(scale: float = 1.0) -> dict:
    """SD 1.5 ``unet/config.json``: 320/640/1280/1280 channels, 2 resnets per block, 8 heads,
    cross-attention 768 (CLIP-L)."""
    s = _check_scale(scale)
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [s.width(c) for c in (320, 640, 1280, 1280)],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": clip_l_config(scale)["hidden_size"],
        "attention_head_dim": s.count(8),  # diffusers' name for the number of heads in SD 1.x
        "norm_num_groups": s.groups,
    }


def sdxl_unet_config(scale: float = 1.0) -> dict:
    """SDXL base ``unet/config.json``: 320/640/1280 channels, transformer layers (1, 2, 10),
    heads of 64, cross-attention 2048 (CLIP-L 768 + bigG 1280), text_time conditioning."""
    s = _check_scale(scale)
    channels = [s.width(c) for c in (320, 640, 1280)]
    time_dim = s.width(256)
    return {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": channels,
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [s.count(n) for n in (1, 2, 10)],
        "attention_head_dim": [max(1, c // 64) for c in channels],  # heads per level: 5, 10, 20
        "use_linear_projection": True,
        "cross_attention_dim": clip_l_config(scale)["hidden_size"] + clip_g_config(scale)["hidden_size"],
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": 6 * time_dim + clip_g_config(scale)["projection_dim"],
        "norm_num_groups": s.groups,
    }


# ----------------------------------------------------------------------------- transformers


def sd3_transformer_config(scale: float = 1.0) -> dict:
    """SD3 medium ``transformer/config.json``: 24 joint blocks, 24 heads x 64, joint attention
    4096 (T5-XXL), pooled 2048 (CLIP-L 768 + CLIP-G 1280 projections)."""
    s = _check_scale(scale)
    heads = s.count(24)
    return {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": s.count(24, least=2),
        "attention_head_dim": 64,
        "num_attention_heads": heads,
        "joint_attention_dim": _t5_width("sd3", scale),
        "caption_projection_dim": heads * 64,
        "pooled_projection_dim": clip_l_config(scale)["projection_dim"]
        + clip_g_config(scale)["projection_dim"],
        "pos_embed_max_size": 192,
    }


def flux_transformer_config(scale: float = 1.0) -> dict:
    """Flux dev ``transformer/config.json``: 19 double-stream and 38 single-stream blocks,
    24 heads x 128 (RoPE axes 16/56/56), joint attention 4096 (T5-XXL), pooled 768 (CLIP-L),
    guidance embedding."""
    s = _check_scale(scale)
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": s.count(19),
        "num_single_layers": s.count(38),
        "attention_head_dim": 128,
        "num_attention_heads": s.count(24),
        "joint_attention_dim": _t5_width("flux", scale),
        "pooled_projection_dim": clip_l_config(scale)["hidden_size"],
        "guidance_embeds": True,
        "axes_dims_rope": [16, 56, 56],
    }


def _t5_width(preset: str, scale: float) -> int:
    """T5-XXL's 4096, scaled; SD3 pads the CLIP states (L + G) to it, so it holds them."""
    width = Scale(scale).width(4096)
    if preset == "sd3":
        width = max(width, clip_l_config(scale)["hidden_size"] + clip_g_config(scale)["hidden_size"])
    return width


def qwen_image_transformer_config(scale: float = 1.0) -> dict:
    """Qwen-Image ``transformer/config.json``: 60 dual-stream blocks, 24 heads x 128 (RoPE axes
    16/56/56), joint attention 3584 (Qwen2.5-VL-7B's width), 16 latent channels in 2 x 2 patches
    (64 in), no guidance embedding."""
    s = _check_scale(scale)
    return {
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": s.count(60),
        "attention_head_dim": 128,
        "num_attention_heads": s.count(24),
        "joint_attention_dim": qwen2_5_vl_config(scale)["text_config"]["hidden_size"],
        "guidance_embeds": False,
        "axes_dims_rope": [16, 56, 56],
    }


def z_image_transformer_config(scale: float = 1.0) -> dict:
    """Z-Image (Turbo) ``transformer/config.json``: 2 noise- and 2 context-refiner blocks, 30
    main blocks, 30 heads x 128 (RoPE axes 32/48/48 over 1536/512/512 positions, theta 256),
    captions of 2560 features (Qwen3-4B's width), 2 x 2 patches of 16 latent channels."""
    s = _check_scale(scale)
    heads = s.count(30)
    return {
        "all_patch_size": [2],
        "all_f_patch_size": [1],
        "in_channels": 16,
        "dim": heads * 128,
        "n_layers": s.count(30),
        "n_refiner_layers": s.count(2),
        "n_heads": heads,
        "n_kv_heads": heads,
        "norm_eps": 1e-05,
        "qk_norm": True,
        "cap_feat_dim": qwen3_config(scale)["hidden_size"],
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": [32, 48, 48],
        "axes_lens": [1536, 512, 512],
    }


# ----------------------------------------------------------------------------- VAEs and text encoders


def vae_config(preset: str, scale: float = 1.0) -> dict:
    """The SD VAE (128/256/512/512 channels, 2 resnets per block): 4 latent channels for SD 1.5 and
    SDXL, 16 for SD3 and Flux (no quant convolutions), with each model's scaling and shift."""
    s = _check_scale(scale)
    latent = 16 if preset in ("sd3", "flux") else 4
    config = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [s.width(c) for c in (128, 256, 512, 512)],
        "layers_per_block": 2,
        "latent_channels": latent,
        "norm_num_groups": s.groups,
        "sample_size": {"sd15": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}[preset],
        "scaling_factor": {"sd15": 0.18215, "sdxl": 0.13025, "sd3": 1.5305, "flux": 0.3611}[preset],
    }
    if latent == 16:
        config.update(
            shift_factor={"sd3": 0.0609, "flux": 0.1159}[preset],
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    return config


# fmt: off
#: Qwen-Image's per-channel latent means and standard deviations (``vae/config.json``)
QWEN_IMAGE_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
QWEN_IMAGE_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
# fmt: on


def qwen_image_vae_config(scale: float = 1.0) -> dict:
    """Qwen-Image ``vae/config.json`` (Wan 2.1's causal video VAE): base 96 channels x (1, 2, 4, 4),
    2 residual blocks per level, time downsampled at the last two levels, 16 latent channels
    normalised by their published means and standard deviations."""
    s = _check_scale(scale)
    return {
        "base_dim": s.width(96),
        "z_dim": 16,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "dropout": 0.0,
        "latents_mean": list(QWEN_IMAGE_LATENTS_MEAN),
        "latents_std": list(QWEN_IMAGE_LATENTS_STD),
    }


def z_image_vae_config(scale: float = 1.0) -> dict:
    """Z-Image's VAE is Flux's (16 latent channels, scaling 0.3611, shift 0.1159)."""
    return vae_config("flux", scale)


def qwen2_5_vl_config(scale: float = 1.0) -> dict:
    """Qwen2.5-VL-7B-Instruct's ``config.json`` (Qwen-Image's ``text_encoder``): a 28-layer decoder of
    width 3584 (28 heads x 128, 4 key-value heads, MLP 18944, multimodal RoPE sections 16/24/24)
    and its 32-block vision tower (width 1280, 16 heads, MLP 3420, window attention with full
    attention every 8th block), without the vocabulary (the tokenizer's)."""
    s = _check_scale(scale)
    depth = s.count(32)
    return {
        "text_config": {
            "hidden_size": s.count(28) * 128,
            "intermediate_size": s.width(18944),
            "num_hidden_layers": s.count(28),
            "num_attention_heads": s.count(28),
            "num_key_value_heads": s.count(4),
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "depth": depth,
            "hidden_size": s.count(16) * 80,
            "intermediate_size": s.count(3420),  # not a multiple of 32: scaled as a count
            "num_heads": s.count(16),
            "out_hidden_size": s.count(28) * 128,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": sorted({(i + 1) * depth // 4 - 1 for i in range(4)} - {-1}),
            "tokens_per_second": 2,
        },
        "tie_word_embeddings": False,
    }


def qwen3_config(scale: float = 1.0) -> dict:
    """Qwen3-4B's ``config.json`` (Z-Image's ``text_encoder``): 36 layers of width 2560, 32 heads and
    8 key-value heads of 128, MLP 9728, tied embeddings, without the vocabulary (the tokenizer's)."""
    s = _check_scale(scale)
    return {
        "hidden_size": s.width(2560),
        "intermediate_size": s.width(9728),
        "num_hidden_layers": s.count(36),
        "num_attention_heads": s.count(32),
        "num_key_value_heads": s.count(8),
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    }


def _clip_text_config(scale: float, heads: int, layers: int, act: str) -> dict:
    """A CLIP text tower of ``heads`` x 64 width (MLP 4x), ``layers`` deep, projection = width."""
    s = _check_scale(scale)
    width = s.count(heads) * 64
    return {
        "hidden_size": width,
        "intermediate_size": width * 4,
        "num_hidden_layers": s.count(layers),
        "num_attention_heads": s.count(heads),
        "max_position_embeddings": 77,
        "hidden_act": act,
        "projection_dim": width,
    }


def clip_l_config(scale: float = 1.0) -> dict:
    """CLIP ViT-L/14's text tower: width 768, 12 layers, 12 heads, quick-GELU, projection 768."""
    return _clip_text_config(scale, heads=12, layers=12, act="quick_gelu")


def clip_g_config(scale: float = 1.0) -> dict:
    """OpenCLIP bigG/14's text tower: width 1280, 32 layers, 20 heads, GELU, projection 1280."""
    return _clip_text_config(scale, heads=20, layers=32, act="gelu")


# ----------------------------------------------------------------------------- FLUX.2 [dev]


def flux2_transformer_config(scale: float = 1.0) -> dict:
    """FLUX.2 [dev] ``transformer/config.json``: 8 double-stream and 48 single-stream blocks,
    48 heads x 128 (RoPE axes 32 x 4, theta 2000), MLP ratio 3, 128 input channels (the VAE's
    32 channels in 2 x 2 patches), joint attention 15360 (three hidden states of Mistral Small
    3.x side by side), guidance embedding."""
    s = _check_scale(scale)
    return {
        "patch_size": 1,
        "in_channels": 128,
        "num_layers": s.count(8),
        "num_single_layers": s.count(48),
        "attention_head_dim": 128,
        "num_attention_heads": s.count(48),
        "joint_attention_dim": FLUX2_TEXT_LAYERS * mistral3_text_config(scale)["hidden_size"],
        "timestep_guidance_channels": 256,
        "mlp_ratio": 3.0,
        "axes_dims_rope": [32, 32, 32, 32],
        "rope_theta": 2000,
        "guidance_embeds": True,
    }


#: ``Flux2Pipeline`` joins Mistral's hidden states 10, 20 and 30 (``text_encoder_out_layers``)
FLUX2_TEXT_LAYERS = 3
#: so a scaled Mistral keeps at least this many layers
FLUX2_MIN_TEXT_LAYERS = 30


def mistral3_text_config(scale: float = 1.0) -> dict:
    """Mistral Small 3.2 24B's language model (FLUX.2's ``text_encoder``): width 5120, 40 layers,
    32 query and 8 key/value heads of 128, MLP 32768, RoPE theta 1e9, vocabulary 131072 (ours
    replaces it); at least 30 layers when scaled (module doc)."""
    s = _check_scale(scale)
    return {
        "vocab_size": 131072,
        "hidden_size": s.width(5120),
        "intermediate_size": s.width(32768),
        "num_hidden_layers": max(FLUX2_MIN_TEXT_LAYERS, s.count(40)),
        "num_attention_heads": s.count(32),
        "num_key_value_heads": s.count(8),
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e9,
        "sliding_window": None,
    }


def pixtral_vision_config(scale: float = 1.0) -> dict:
    """Its Pixtral vision tower (unused by text prompts, part of the released weights): width
    1024, 24 layers, 16 heads of 64, MLP 4096, patches of 14 px, images up to 1540 px."""
    s = _check_scale(scale)
    return {
        "hidden_size": s.count(16) * 64,
        "intermediate_size": s.count(16) * 64 * 4,
        "num_hidden_layers": s.count(24),
        "num_attention_heads": s.count(16),
        "head_dim": 64,
        "patch_size": 14,
        "image_size": 1540,
        "rope_theta": 10000.0,
    }


def mistral3_config(scale: float = 1.0, vocab_size: int | None = None) -> dict:
    """``Mistral3ForConditionalGeneration``'s config (language model, vision tower, a projector
    merging 2 x 2 patches, untied output embedding)."""
    text = mistral3_text_config(scale)
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    return {
        "text_config": text,
        "vision_config": pixtral_vision_config(scale),
        "spatial_merge_size": 2,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": False,
        "image_token_index": 10,
        "vision_feature_layer": -1,
        "tie_word_embeddings": False,
    }


def flux2_vae_config(scale: float = 1.0) -> dict:
    """FLUX.2's ``AutoencoderKLFlux2``: the SD VAE's 128/256/512/512 channels with 32 latent
    channels, whose 2 x 2 patches a batch norm of 128 features normalises."""
    s = _check_scale(scale)
    return {
        "block_out_channels": [s.width(c) for c in (128, 256, 512, 512)],
        "latent_channels": 32,
        "norm_num_groups": s.groups,
        "layers_per_block": 2,
        "batch_norm_eps": 1e-4,
    }


# ----------------------------------------------------------------------------- Wan 2.1 T2V 14B


def wan_transformer_config(scale: float = 1.0) -> dict:
    """Wan 2.1 text-to-video 14B ``transformer/config.json`` (also each of Wan 2.2 T2V A14B's
    two experts): 40 blocks, 40 heads x 128, feed-forward 13824, patches 1 x 2 x 2 of 16 latent
    channels, text 4096 (UMT5-XXL), RMS QK norm across heads."""
    s = _check_scale(scale)
    return {
        "patch_size": [1, 2, 2],
        "num_attention_heads": s.count(40),
        "attention_head_dim": 128,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": umt5_config(scale)["d_model"],
        "freq_dim": 256,
        "ffn_dim": s.width(13824),
        "num_layers": s.count(40),
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
    }


def umt5_config(scale: float = 1.0, vocab_size: int = 256384) -> dict:
    """UMT5-XXL's encoder (Wan's ``text_encoder``): width 4096, 24 layers, 64 heads of 64,
    gated-GELU feed-forward 10240, relative attention 32 buckets up to 128."""
    s = _check_scale(scale)
    return {
        "vocab_size": vocab_size,
        "d_model": s.count(64) * 64,
        "d_kv": 64,
        "d_ff": s.width(10240),
        "num_layers": s.count(24),
        "num_heads": s.count(64),
        "feed_forward_proj": "gated-gelu",
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.1,
        "tie_word_embeddings": False,
    }


def wan_vae_config(scale: float = 1.0) -> dict:
    """Wan 2.1's ``AutoencoderKLWan``: base width 96 (x 1, 2, 4, 4), 16 latent channels, 8 x
    spatial and 4 x temporal compression, and the released per-channel latent mean and std
    (diffusers' defaults)."""
    _check_scale(scale)
    return {
        "base_dim": max(8, round(96 * scale / 8) * 8),  # RMS norms: no group count to respect
        "z_dim": 16,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "temperal_downsample": [False, True, True],
        "scale_factor_temporal": 4,
        "scale_factor_spatial": 8,
    }


#: Wan 2.1's scheduler: UniPC on flow sigmas shifted by 3 (``flow_shift``)
WAN_SCHEDULER = {
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "num_train_timesteps": 1000,
    "flow_shift": 3.0,
}


def assemble_flux2_pipeline(tokenizer, transformer, vae, text_encoder, scheduler=None):
    """``Flux2Pipeline`` from its models; ``tokenizer`` in Mistral's chat format
    (:func:`.tokenizer.add_mistral_chat_format`, module doc); ``scheduler`` default: FLUX.2
    [dev]'s (Flux dev's dynamic shifting)."""
    import diffusers

    scheduler = scheduler or diffusers.FlowMatchEulerDiscreteScheduler(**_FLOW_SCHEDULERS["flux"])
    return diffusers.Flux2Pipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
    )


def assemble_wan_pipeline(tokenizer, transformer, vae, text_encoder, scheduler=None):
    """``WanPipeline`` from its models (``tokenizer`` standing in for UMT5's); ``scheduler``
    default: Wan 2.1's (:data:`WAN_SCHEDULER`)."""
    import diffusers

    scheduler = scheduler or diffusers.UniPCMultistepScheduler(**WAN_SCHEDULER)
    return diffusers.WanPipeline(
        transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )


def _random_flux2(tok, scale: float):
    import diffusers
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from .tokenizer import add_mistral_chat_format

    transformer = diffusers.Flux2Transformer2DModel(**flux2_transformer_config(scale))
    vae = diffusers.AutoencoderKLFlux2(**flux2_vae_config(scale))
    add_mistral_chat_format(tok)
    encoder = Mistral3ForConditionalGeneration(Mistral3Config(**mistral3_config(scale, len(tok))))
    return assemble_flux2_pipeline(tok, transformer, vae, encoder)


def _random_wan(tok, scale: float):
    import diffusers
    from transformers import UMT5Config, UMT5EncoderModel

    transformer = diffusers.WanTransformer3DModel(**wan_transformer_config(scale))
    vae = diffusers.AutoencoderKLWan(**wan_vae_config(scale))
    encoder = UMT5EncoderModel(UMT5Config(**umt5_config(scale, len(tok))))
    return assemble_wan_pipeline(tok, transformer, vae, encoder)


# ----------------------------------------------------------------------------- pipelines


def assemble_pipeline(preset: str, tokenizer, denoiser, vae, text_encoders: list, scheduler=None):
    """The diffusers pipeline of ``preset`` from its models: ``denoiser`` (UNet or transformer),
    ``vae`` and ``text_encoders`` in the pipeline's order (SD 1.5: CLIP-L; SDXL: CLIP-L, CLIP-G;
    SD3: CLIP-L, CLIP-G, T5; Flux: CLIP-L, T5; the others: their one), ``tokenizer`` for every text encoder;
    ``scheduler`` default: the preset's. What :func:`build_random_pipeline` builds at a scale,
    and the tests' tiny pipelines at sizes no scale reaches (fewer resolution levels)."""
    import diffusers

    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: allowed {' | '.join(PRESETS)}")
    if preset in ("flux2", "wan"):  # one text encoder, a scheduler of their own
        assemble = assemble_flux2_pipeline if preset == "flux2" else assemble_wan_pipeline
        return assemble(tokenizer, denoiser, vae, *text_encoders, scheduler=scheduler)
    if preset in ("sd15", "sdxl"):
        scheduler = scheduler or _sd_scheduler()
    else:
        scheduler = scheduler or diffusers.FlowMatchEulerDiscreteScheduler(**_FLOW_SCHEDULERS[preset])
    names = ["text_encoder", "text_encoder_2", "text_encoder_3"][: len(text_encoders)]
    models = dict(zip(names, text_encoders))
    models |= {n.replace("text_encoder", "tokenizer"): tokenizer for n in names}
    if preset == "sd15":
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        return diffusers.StableDiffusionPipeline(
            unet=denoiser, vae=vae, scheduler=scheduler, **models, **extra
        )
    if preset == "sdxl":
        return diffusers.StableDiffusionXLPipeline(unet=denoiser, vae=vae, scheduler=scheduler, **models)
    if preset == "qwen-image":
        return diffusers.QwenImagePipeline(transformer=denoiser, vae=vae, scheduler=scheduler, **models)
    if preset == "z-image":
        return diffusers.ZImagePipeline(transformer=denoiser, vae=vae, scheduler=scheduler, **models)
    pipeline_class = diffusers.StableDiffusion3Pipeline if preset == "sd3" else diffusers.FluxPipeline
    return pipeline_class(transformer=denoiser, vae=vae, scheduler=scheduler, **models)


#: the flow-matching schedulers of SD3 medium, Flux dev, Qwen-Image and Z-Image
_FLOW_SCHEDULERS = {
    "sd3": {"shift": 3.0},
    "flux": {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
    "qwen-image": {
        "shift": 1.0,
        "use_dynamic_shifting": True,
        "time_shift_type": "exponential",
        "base_image_seq_len": 256,
        "max_image_seq_len": 8192,
        "base_shift": 0.5,
        "max_shift": 0.9,
        "shift_terminal": 0.02,
    },
    "z-image": {"shift": 3.0},
}


def build_random_pipeline(preset: str, tokenizer_dir: str | Path, scale: float = 1.0):
    """The diffusers pipeline of ``preset`` with random weights (tokenizer files go to ``tokenizer_dir``)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .tokenizer import write_tokenizer

    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: allowed {' | '.join(PRESETS)}")
    if preset in ("qwen-image", "z-image"):
        return _build_qwen_text_pipeline(preset, scale)
    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(tokenizer_dir)))
    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    ids["pad_token_id"] = tok.pad_token_id

    def clip(config: dict, cls=CLIPTextModel):
        return cls(CLIPTextConfig(**config, **ids))

    if preset in _OWN_TEXT_ENCODERS:
        return _OWN_TEXT_ENCODERS[preset](tok, scale)
    vae = diffusers.AutoencoderKL(**vae_config(preset, scale))
    if preset == "sd15":
        unet = diffusers.UNet2DConditionModel(**sd15_unet_config(scale))
        return assemble_pipeline(preset, tok, unet, vae, [clip(clip_l_config(scale))])
    if preset == "sdxl":
        unet = diffusers.UNet2DConditionModel(**sdxl_unet_config(scale))
        encoders = [clip(clip_l_config(scale)), clip(clip_g_config(scale), CLIPTextModelWithProjection)]
        return assemble_pipeline(preset, tok, unet, vae, encoders)
    if preset == "sd3":
        transformer = diffusers.SD3Transformer2DModel(**sd3_transformer_config(scale))
        encoders = [
            clip(clip_l_config(scale), CLIPTextModelWithProjection),
            clip(clip_g_config(scale), CLIPTextModelWithProjection),
            _t5(transformer.config.joint_attention_dim, len(tok)),
        ]
        return assemble_pipeline(preset, tok, transformer, vae, encoders)
    transformer = diffusers.FluxTransformer2DModel(**flux_transformer_config(scale))
    encoders = [clip(clip_l_config(scale)), _t5(transformer.config.joint_attention_dim, len(tok))]
    return assemble_pipeline(preset, tok, transformer, vae, encoders)


#: the presets whose text encoders are built in full (module doc)
_OWN_TEXT_ENCODERS = {"flux2": _random_flux2, "wan": _random_wan}


def _build_qwen_text_pipeline(preset: str, scale: float):
    """Qwen-Image (Qwen2.5-VL text encoder, video VAE) or Z-Image (Qwen3 text encoder, Flux's VAE)
    with our vocabulary as a Qwen2 tokenizer."""
    import diffusers

    from .qwen_tokenizer import qwen_tokenizer

    tok = qwen_tokenizer()
    if preset == "qwen-image":
        transformer = diffusers.QwenImageTransformer2DModel(**qwen_image_transformer_config(scale))
        vae = diffusers.AutoencoderKLQwenImage(**qwen_image_vae_config(scale))
        encoder = qwen2_5_vl_encoder(qwen2_5_vl_config(scale), tok)
    else:
        transformer = diffusers.ZImageTransformer2DModel(**z_image_transformer_config(scale))
        vae = diffusers.AutoencoderKL(**z_image_vae_config(scale))
        encoder = qwen3_encoder(qwen3_config(scale), tok)
    return assemble_pipeline(preset, tok, transformer, vae, [encoder])


def _token_ids(tok) -> dict:
    """Qwen's special-token ids in ``tok``: ``<|endoftext|>`` begins and pads, ``<|im_end|>`` ends."""
    from .qwen_tokenizer import END_OF_TEXT, IM_END

    text, end = tok.convert_tokens_to_ids([END_OF_TEXT, IM_END])
    return {"vocab_size": len(tok), "bos_token_id": text, "eos_token_id": end, "pad_token_id": text}


def qwen2_5_vl_encoder(config: dict, tok):
    """``Qwen2_5_VLForConditionalGeneration`` of a :func:`qwen2_5_vl_config` for the tokenizer ``tok``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = _token_ids(tok)
    text = {**config["text_config"], **ids}
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**{**config, "text_config": text}, **ids))


def qwen3_encoder(config: dict, tok):
    """``Qwen3Model`` (the decoder without its LM head, as Z-Image loads it) of a
    :func:`qwen3_config` for the tokenizer ``tok``."""
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(**config, **_token_ids(tok)))


def _sd_scheduler():
    """SD 1.5 / SDXL's noise schedule (scaled linear betas 0.00085 .. 0.012, 1000 steps)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )


def _t5(width: int, vocab_size: int):
    """One gated-GELU T5 encoder layer (T5 v1.1, as SD3 and Flux use) of the given width."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=width,
            d_kv=64,
            d_ff=256,
            num_layers=1,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
        )
    )


def denoiser_config(preset: str, scale: float = 1.0) -> dict:
    """The UNet or transformer config of ``preset`` (what the benchmarks build alone)."""
    return {
        "sd15": sd15_unet_config,
        "sdxl": sdxl_unet_config,
        "sd3": sd3_transformer_config,
        "flux": flux_transformer_config,
        "qwen-image": qwen_image_transformer_config,
        "z-image": z_image_transformer_config,
        "flux2": flux2_transformer_config,
        "wan": wan_transformer_config,
    }[preset](scale)


def save_random_pipeline(
    preset: str, output: str | Path, scale: float = 1.0, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Path:
    """Build the pipeline with ``dtype`` parameters and save it to ``output`` atomically
    (a temporary folder beside it, renamed when complete; an existing ``output`` is refused)."""
    import tempfile

    from ..utils.io import atomic_dir

    output = Path(output)
    if output.exists():
        raise ValueError(f"{output} exists; choose a new folder")
    torch.manual_seed(seed)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype: a float32 copy of Flux alone is 48 GB
    try:
        with tempfile.TemporaryDirectory() as tok_dir:
            pipe = build_random_pipeline(preset, tok_dir, scale)
    finally:
        torch.set_default_dtype(saved)
    with atomic_dir(output) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return output
