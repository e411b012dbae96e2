"""A tiny Wan text-to-video pipeline built from configs (random weights), assembled as
``reslora_diffusers.data.random_pipelines`` assembles its ``wan`` preset, at sizes no preset
scale reaches: three blocks 16 wide, a video VAE 8 wide with 4 latent channels (8 x spatial,
4 x temporal compression), a two-layer UMT5 encoder 32 wide; and short clips to train on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from PIL import Image
from transformers import UMT5Config, UMT5EncoderModel

from reslora_diffusers.data import random_pipelines as rp
from tests.tiny_pipes import TEXT_DIM, tiny_tokenizer

LATENT_CHANNELS = 4
#: the frame size the tests train at (4 x 4 latents, 2 x 2 tokens per latent frame)
SIDE = 32


def tiny_wan_transformer(seed: int = 0, layers: int = 3) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        text_dim=TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=layers,
    )


def tiny_wan_vae(seed: int = 0) -> AutoencoderKLWan:
    """Wan's VAE layout (4 levels, temporal downsampling at the last two) 8 wide, with latent
    statistics away from (0, 1), so that their normalisation shows."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=(torch.rand(LATENT_CHANNELS, generator=gen) - 0.5).tolist(),
        latents_std=(1 + torch.rand(LATENT_CHANNELS, generator=gen)).tolist(),
    )


def tiny_umt5(vocab_size: int, seed: int = 0) -> UMT5EncoderModel:
    torch.manual_seed(seed)
    config = {**rp.umt5_config(), "vocab_size": vocab_size, "d_model": TEXT_DIM, "d_kv": 8, "d_ff": 48}
    config.update(num_layers=2, num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0)
    return UMT5EncoderModel(UMT5Config(**config))


def tiny_wan_pipeline(tmp: Path, seed: int = 0) -> WanPipeline:
    tok = tiny_tokenizer(tmp)
    vae, encoder = tiny_wan_vae(seed), tiny_umt5(len(tok), seed)
    return rp.assemble_wan_pipeline(tok, tiny_wan_transformer(seed), vae, encoder)


def moving_square(frames: int, side: int = SIDE, colour=(220, 40, 40), seed: int = 0) -> list[Image.Image]:
    """A square moving right across a grey field, one position per frame (noise in the field,
    so that frames and clips differ)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(frames):
        pixels = np.full((side, side, 3), 128, np.uint8) + rng.integers(
            0, 20, (side, side, 3), dtype=np.uint8
        )
        left = (i * 3) % (side - 8)
        pixels[12:20, left : left + 8] = colour
        out.append(Image.fromarray(pixels))
    return out


def clip_folder(root: Path, layout: str = "txt") -> Path:
    """Training clips in both kinds a user has: an animated GIF (9 frames), an animated WebP
    (7 frames: trains on 5), a frame folder (9 PNGs) and a still PNG (one frame), captioned by
    ``.txt`` files beside them (``layout="txt"``) or by ``metadata.jsonl`` (``"jsonl"``)."""
    import json

    root.mkdir(parents=True)
    captions = {}
    gif = moving_square(9, seed=1)
    gif[0].save(root / "red.gif", save_all=True, append_images=gif[1:], duration=62, loop=0)
    captions["red.gif"] = "a red square moves right"
    webp = moving_square(7, colour=(40, 40, 220), seed=2)
    webp[0].save(root / "blue.webp", save_all=True, append_images=webp[1:], duration=62, lossless=True)
    captions["blue.webp"] = "a blue square moves right"
    (root / "green").mkdir()
    for i, frame in enumerate(moving_square(9, colour=(40, 200, 40), seed=3)):
        frame.save(root / "green" / f"frame_{i + 1}.png")  # numbered 1..9: name order is not number order
    captions["green"] = "a green square moves right"
    moving_square(1, colour=(220, 220, 40), seed=4)[0].save(root / "still.png")
    captions["still.png"] = "a yellow square"
    if layout == "txt":
        for name, text in captions.items():
            (root / (Path(name).stem + ".txt")).write_text(text + "\n")
    else:
        lines = [json.dumps({"file_name": name, "text": text}) for name, text in captions.items()]
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root
