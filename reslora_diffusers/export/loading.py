"""Check a LoRA file against a pipeline before loading it, with errors a person can act on, and load it."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..utils.quiet import NO_KEYS_FOR_COMPONENT, dropped_log_messages
from ..utils.safety import check_finite_file
from .diffusers import DIFFUSERS_FILE
from .kohya import KEY_PREFIXES, kohya_component


def resolve_lora_file(path: str | Path) -> Path:
    """A ``.safetensors`` file, or a training/export folder holding ``pytorch_lora_weights.safetensors``."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    return path


def check_lora_file(pipe, path: str | Path) -> Path:
    """Raise ``ValueError`` naming the first key of ``path`` that does not fit ``pipe``.

    diffusers-format keys (``unet.<module>.lora_A.weight``...) are checked module by module
    (it must exist and ``A`` must be ``(r, in)``, ``B`` ``(out, r)``, with kernel dimensions for
    convolutions); kohya-format files are
    accepted when they hold kohya LoRA keys for components the pipeline has (diffusers'
    converter checks their layers on load).
    """
    path = resolve_lora_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path.name} is not a safetensors file ({err})") from err
    lora_keys = [k for k in shapes if ".lora_A." in k or ".lora_B." in k]
    if not lora_keys:
        kohya = sorted(k for k in shapes if k.startswith(KEY_PREFIXES) and ".lora_down." in k)
        if not kohya:
            raise ValueError(
                f"{path.name} holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys)"
            )
        for key in kohya:  # a kohya file's layers are checked by diffusers' converter on load
            component = kohya_component(key)
            if getattr(pipe, component, None) is None:
                raise ValueError(
                    f"{path.name}: kohya key {key!r} is for component {component!r}, which this pipeline lacks"
                )
        return path
    for key in sorted(lora_keys):
        _check_key(pipe, path.name, key, shapes[key])
    return path


def load_lora_file(pipe, path: str | Path) -> Path:
    """Load the LoRA ``path`` (a file, or a folder holding ``pytorch_lora_weights.safetensors``)
    into ``pipe`` with diffusers' ``load_lora_weights``, as any user of the file loads it, after
    :func:`check_lora_file` and a check for NaN or infinite weights (which would draw black
    images). diffusers' warning for each component the file has no keys for (the text encoders
    of a UNet-only LoRA) is dropped: every key the file holds was checked. Returns the file."""
    path = check_lora_file(pipe, path)
    check_finite_file(path)
    with dropped_log_messages(*NO_KEYS_FOR_COMPONENT):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    return path


def _check_key(pipe, filename: str, key: str, shape: tuple[int, ...]) -> None:
    component, _, rest = key.partition(".")
    module_root = getattr(pipe, component, None)
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
