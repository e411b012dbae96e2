"""Tiny random transformers models of every family the LM front end has presets for."""

from __future__ import annotations

import torch
import transformers as tf

from reslora_diffusers import ResLoRAConfig, add_reslora
from tests.toys import randomize_lora

V = 40  # vocabulary size of every tiny model
SMALL = dict(num_hidden_layers=3, num_attention_heads=2, intermediate_size=48)


def tiny(family: str, head: str = "lm") -> tf.PreTrainedModel:
    """A random tiny model of ``family``, the same weights on every call."""
    torch.manual_seed(0)
    decoder = dict(vocab_size=V, hidden_size=32, num_key_value_heads=1, **SMALL, initializer_range=0.2)
    configs = {
        "llama": lambda: tf.LlamaConfig(**decoder, tie_word_embeddings=False),
        "mistral": lambda: tf.MistralConfig(**decoder),
        "qwen2": lambda: tf.Qwen2Config(**decoder),
        "qwen3": lambda: tf.Qwen3Config(**decoder, head_dim=16),
        "gpt2": lambda: tf.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=3, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=2
        ),
        "bert": lambda: tf.BertConfig(vocab_size=V, hidden_size=32, **SMALL, max_position_embeddings=32),
        "roberta": lambda: tf.RobertaConfig(
            vocab_size=V, hidden_size=32, **SMALL, max_position_embeddings=34
        ),
        "clip_text_model": lambda: tf.CLIPTextConfig(
            vocab_size=V, hidden_size=32, **SMALL, bos_token_id=1, eos_token_id=2
        ),
    }
    config = configs[family]()
    if family == "clip_text_model":
        return tf.CLIPTextModel(config)
    if head == "cls":
        return tf.AutoModelForSequenceClassification.from_config(config).eval()
    encoder = family in ("bert", "roberta")
    return (tf.AutoModelForMaskedLM if encoder else tf.AutoModelForCausalLM).from_config(config).eval()


def with_reslora(family: str, res_type: str, pre_num: int = 2, head: str = "lm", scale: float = 0.2):
    """``tiny(family)`` with ResLoRA (rank 2, s = 2) and random non-zero A, B."""
    model = add_reslora(
        tiny(family, head), ResLoRAConfig(rank=2, alpha=4, res_type=res_type, pre_num=pre_num)
    )
    randomize_lora(model, 0, scale=scale)
    return model


def ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def out(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids=x)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state
