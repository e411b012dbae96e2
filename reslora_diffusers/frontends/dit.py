"""What the diffusion transformers (SD3's MMDiT, Flux) share: the joint-attention targets.

Their joint attention has two streams: the image tokens go through ``to_q/to_k/to_v`` and
``to_out.0``, the text tokens through ``add_q_proj/add_k_proj/add_v_proj`` and ``to_add_out``.
The core wraps these projections in place, so diffusers' own attention processors (RoPE,
QK norms, the text/image split) run unchanged and call the wrapped layers.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import FrontEnd, is_instance

#: the attention projections of both streams (diffusers' SD3 and Flux LoRA scripts' default)
DIT_ATTENTION_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
#: the feed-forward layers of a joint block's image stream: with the attention targets, what the
#: embedded DiT base needs to learn a new shape (README, fine-tuning the DiT base)
DIT_IMAGE_FEEDFORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")
#: the feed-forward layers of both streams of a joint block
DIT_FEEDFORWARD_TARGETS = (*DIT_IMAGE_FEEDFORWARD_TARGETS, "ff_context.net.0.proj", "ff_context.net.2")


class DiTFrontEnd(FrontEnd):
    """A diffusers diffusion transformer class; targets the joint-attention projections."""

    priority = 20
    #: the diffusers class name of the family's transformer
    model_class = ""

    def matches(self, model: nn.Module) -> bool:
        return is_instance(model, "diffusers", (self.model_class,))

    def default_targets(self, model: nn.Module) -> list[str]:
        return list(DIT_ATTENTION_TARGETS)


def text_conditioning(model: nn.Module, batch: int, tokens: int, gen: torch.Generator) -> dict:
    """N(0, 1) sequence text states (``joint_attention_dim``) and pooled ones (``pooled_projection_dim``)."""
    cfg = model.config
    return {
        "encoder_hidden_states": torch.randn(batch, tokens, cfg.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=gen),
    }
