"""The diffusers/PEFT LoRA file: ``pytorch_lora_weights.safetensors``.

Keys are ``<component>.<module path>.lora_A.weight`` (``A``, ``r x in`` or ``r x in x kh x kw``)
and ``.lora_B.weight`` (``B``, ``out x r`` or ``out x r x 1 x 1``) with the scale baked into
``B``, so that ``pipe.load_lora_weights(folder)`` (which reads this file name by default) gives
the merged model with no extra arguments. Every pipeline family loads it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch.nn as nn

from ..core.keys import prefixed
from ..utils.safety import save_safetensors
from .comfyui import COMFYUI_PREFIX
from .formats import ComponentLoRAs, LoRAFormat, register_format

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def _lora_keys(keys: Iterable[str]) -> list[str]:
    """``lora_A``/``lora_B`` keys of pipeline components (ComfyUI's ``diffusion_model.`` keys,
    spelled alike, are the ComfyUI format's)."""
    return [k for k in keys if (".lora_A." in k or ".lora_B." in k) and not k.startswith(COMFYUI_PREFIX)]


class DiffusersFormat(LoRAFormat):
    name = "diffusers"
    file_name = DIFFUSERS_FILE
    description = "diffusers/PEFT keys"
    key_names = "lora_A/lora_B"

    def write(self, path: Path, loras: ComponentLoRAs, components, report, metadata=None) -> None:
        flat = {k: v for name, lora in loras.items() for k, v in prefixed(name, lora).items()}
        save_safetensors(flat, path, metadata={"format": "pt"})

    def owns(self, keys):
        return bool(_lora_keys(keys))

    def components(self, keys):
        return {k.partition(".")[0] for k in _lora_keys(keys)}

    def check(self, pipe, filename, shapes):
        """Module by module: it must exist and ``A`` must be ``(r, in)``, ``B`` ``(out, r)``, with
        kernel dimensions for convolutions."""
        for key in sorted(_lora_keys(shapes)):
            _check_key(pipe, filename, key, shapes[key])


def _check_key(pipe, filename: str, key: str, shape: tuple[int, ...]) -> None:
    component, _, rest = key.partition(".")
    module_root: nn.Module | None = getattr(pipe, component, None)
    if module_root is None:
        raise ValueError(f"{filename}: key {key!r} is for component {component!r}, which this pipeline lacks")
    path = rest.rsplit(".lora_", 1)[0]
    modules = dict(module_root.named_modules())
    if path not in modules and path.removeprefix("text_model.") in modules:
        path = path.removeprefix("text_model.")
    module = modules.get(path)
    weight = getattr(module, "weight", None)
    if weight is None or weight.ndim not in (2, 4):
        raise ValueError(
            f"{filename}: key {key!r} names no linear or convolution layer of the base model "
            "(LoRA for another base?)"
        )
    # A is (r, in[, kh, kw]) and B (out, r[, 1, 1]), as PEFT's Linear and Conv2d LoRA
    fits = len(shape) == weight.ndim and (
        shape[1:] == tuple(weight.shape[1:]) if ".lora_A." in key else shape[0] == weight.shape[0]
    )
    if not fits:
        raise ValueError(
            f"{filename}: key {key!r} has shape {shape}, which does not fit the base layer {tuple(weight.shape)} "
            "(LoRA for another base model?)"
        )


DIFFUSERS = register_format(DiffusersFormat())
