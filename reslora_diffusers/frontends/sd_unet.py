"""Stable Diffusion UNets (SD 1.x, 2.x, SDXL): ``UNet2DConditionModel``.

Every target (attention projections, feed-forward layers, resnet convolutions) is an ordinary
ResLoRA layer under diffusers' own attention processors; the q/k/v projections that read one
tensor share one ``A`` product (:mod:`reslora_diffusers.core.fusion`). kohya names: diffusers paths for SD 1.x/2.x,
the original (SGM) paths for SDXL, as kohya-ss sd-scripts write them.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from .base import FrontEnd, is_instance, register_frontend, to_model

#: The attention projections (diffusers' own default for UNet LoRA).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
#: The transformer blocks' feed-forward layers (GEGLU input projection, output projection),
#: which kohya-ss's LoRA trains by default too.
UNET_FEEDFORWARD_TARGETS = ["ff.net.0.proj", "ff.net.2"]
#: The resnet convolutions and the down/up-sampler convolutions (LoCon, as kohya-ss and
#: LyCORIS train them); ``conv`` matches ``downsamplers.0.conv`` and ``upsamplers.0.conv``.
UNET_CONV_TARGETS = ["conv1", "conv2", "conv_shortcut", "conv"]

_RESNET_SGM = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
    "time_emb_proj": "emb_layers.1",
}
_DOWN = re.compile(r"^down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)$")
_DOWN_SAMPLER = re.compile(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv$")
_MID = re.compile(r"^mid_block\.(attentions|resnets)\.(\d+)\.(.*)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)$")
_UP_SAMPLER = re.compile(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv$")


def _sgm_inner(kind: str, rest: str) -> str:
    """``1.<rest>`` for an attention, ``0.<SGM resnet layer>`` for a resnet."""
    if kind == "attentions":
        return f"1.{rest}"
    if rest not in _RESNET_SGM:
        raise ValueError(f"no SGM (SDXL) name for resnet layer {rest!r}")
    return f"0.{_RESNET_SGM[rest]}"


def sgm_unet_path(path: str, unet: nn.Module) -> str:
    """diffusers SDXL UNet path -> the SGM path kohya-ss writes for it (``L`` = layers per block).

    ``down_blocks.i.{attentions,resnets}.j`` -> ``input_blocks.{1 + i (L+1) + j}.{1,0}``,
    ``down_blocks.i.downsamplers.0.conv`` -> ``input_blocks.{(i+1)(L+1)}.0.op``,
    ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1`` -> ``middle_block.0`` / ``.1`` / ``.2``,
    ``up_blocks.i.{attentions,resnets}.j`` -> ``output_blocks.{i (L+1) + j}.{1,0}``,
    ``up_blocks.i.upsamplers.0.conv`` -> ``output_blocks.{i (L+1) + L}.{2 with attention, else 1}.conv``;
    resnet layers ``conv1``/``conv2``/``conv_shortcut``/``time_emb_proj`` -> ``in_layers.2``/
    ``out_layers.3``/``skip_connection``/``emb_layers.1``.
    """
    per = unet.config.layers_per_block
    if not isinstance(per, int):
        raise ValueError(f"kohya SDXL names need an integer layers_per_block, got {per!r}")
    if m := _DOWN.match(path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + i * (per + 1) + j}.{_sgm_inner(kind, rest)}"
    if m := _DOWN_SAMPLER.match(path):
        return f"input_blocks.{(int(m[1]) + 1) * (per + 1)}.0.op"
    if m := _MID.match(path):
        kind, j, rest = m[1], int(m[2]), m[3]
        index = 1 if kind == "attentions" else 2 * j
        return f"middle_block.{index}.{_sgm_inner(kind, rest).split('.', 1)[1]}"
    if m := _UP.match(path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{i * (per + 1) + j}.{_sgm_inner(kind, rest)}"
    if m := _UP_SAMPLER.match(path):
        i = int(m[1])
        inner = 2 if hasattr(unet.up_blocks[i], "attentions") else 1
        return f"output_blocks.{i * (per + 1) + per}.{inner}.conv"
    raise ValueError(f"no SGM (SDXL) name for UNet module {path!r}")


def is_sdxl_unet(unet: nn.Module) -> bool:
    return unet.config.get("addition_embed_type") == "text_time"


class SDUNet(FrontEnd):
    """``UNet2DConditionModel``: synthetic latents, kohya names."""

    name = "sd_unet"
    priority = 20

    def matches(self, model):
        return is_instance(model, "diffusers", ("UNet2DConditionModel",))

    def default_targets(self, model):
        return list(UNET_TARGETS)

    def synthetic_inputs(self, model, num=2, seed=0, batch=2):
        """N(0, 1) latents (the noisy-latent distribution at large t), uniform timesteps,
        N(0, 1) text states; SDXL's added conditioning where the UNet needs it."""
        cfg = model.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(num):
            kwargs = {
                "sample": torch.randn(batch, cfg.in_channels, size, size, generator=gen),
                "timestep": torch.randint(0, 1000, (batch,), generator=gen),
                "encoder_hidden_states": torch.randn(batch, 16, cfg.cross_attention_dim, generator=gen),
            }
            if is_sdxl_unet(model):
                n_time = 6 * cfg.addition_time_embed_dim
                kwargs["added_cond_kwargs"] = {
                    "text_embeds": torch.randn(
                        batch, cfg.projection_class_embeddings_input_dim - n_time, generator=gen
                    ),
                    "time_ids": torch.rand(batch, 6, generator=gen) * size * 8,
                }
            out.append(to_model(kwargs, model))
        return out

    def kohya_name(self, model, path, layout):
        if layout == "sdxl":
            path = sgm_unet_path(path, model)
        return path.replace(".", "_")


SD_UNET = register_frontend(SDUNet())
