"""T5 text encoders (``T5EncoderModel``: SD3's ``text_encoder_3``, Flux's ``text_encoder_2``).

Targets the attention projections ``q/k/v/o`` and the feed-forward ``DenseReluDense`` layers
(``wi``/``wo``, or ``wi_0``/``wi_1``/``wo`` in the gated T5 v1.1 that SD3 and Flux use). diffusers'
SD3 and Flux LoRA loaders load no T5 weights, so pipelines leave T5 out of
``train_text_encoder``; an encoder adapted on its own exports with ``export_peft_adapter``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import FrontEnd, is_instance, register_frontend

T5_TEXT_TARGETS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")


class T5Text(FrontEnd):
    """ResLoRA on the attention and feed-forward projections of a T5 encoder."""

    name = "t5_text"
    priority = 20

    def matches(self, model):
        return is_instance(model, "transformers", ("T5EncoderModel",))

    def default_targets(self, model):
        return list(T5_TEXT_TARGETS)

    def synthetic_inputs(
        self, model: nn.Module, num: int = 2, seed: int = 0, batch: int = 2, tokens: int = 32
    ) -> list[dict]:
        """Random token ids (``tokens`` per prompt)."""
        gen = torch.Generator().manual_seed(seed)
        shape = (batch, tokens)
        return [
            {"input_ids": torch.randint(0, model.config.vocab_size, shape, generator=gen).to(model.device)}
            for _ in range(num)
        ]


T5_TEXT = register_frontend(T5Text())
