"""LoRA state-dict key names, in one place.

A plain LoRA is ``{"<module path>.lora_A.weight": A, "<module path>.lora_B.weight": B}``
(PEFT's names, ``dW = B @ A``); files of several components prefix each key with the
component (``unet.``, ``text_encoder.``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

_SUFFIX = {"A": ".lora_A.weight", "B": ".lora_B.weight"}


def lora_key(path: str, factor: str) -> str:
    """``<path>.lora_A.weight`` (``factor="A"``) or ``<path>.lora_B.weight`` (``"B"``)."""
    return path + _SUFFIX[factor]


def lora_paths(lora: dict[str, torch.Tensor]) -> Iterator[str]:
    """The module paths of a plain LoRA state dict, in key order."""
    for key in lora:
        if key.endswith(_SUFFIX["A"]):
            yield key[: -len(_SUFFIX["A"])]


def lora_factors(lora: dict[str, torch.Tensor], path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of module ``path``."""
    return lora[lora_key(path, "A")], lora[lora_key(path, "B")]


def prefixed(prefix: str, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``lora`` with ``prefix.`` before every key, tensors on the CPU and contiguous (for files)."""
    return {f"{prefix}.{k}" if prefix else k: v.detach().cpu().contiguous() for k, v in lora.items()}
