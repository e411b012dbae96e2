"""Check a LoRA file against a pipeline before loading it, with errors a person can act on."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from .export import DIFFUSERS_FILE

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


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
    (it must exist and ``A`` must be ``(r, in)``, ``B`` ``(out, r)``); kohya-format files are
    accepted when they hold kohya LoRA keys (diffusers' converter checks them on load).
    """
    path = resolve_lora_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path.name} is not a safetensors file ({err})") from err
    lora_keys = [k for k in shapes if ".lora_A." in k or ".lora_B." in k]
    if not lora_keys:
        if any(k.startswith(KOHYA_PREFIXES) and ".lora_down." in k for k in shapes):
            return path
        raise ValueError(f"{path.name} holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys)")
    for key in sorted(lora_keys):
        _check_key(pipe, path.name, key, shapes[key])
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
    if weight is None or weight.ndim != 2:
        raise ValueError(
            f"{filename}: key {key!r} names no linear layer of the base model (LoRA for another base?)"
        )
    out_f, in_f = weight.shape
    if (
        len(shape) != 2
        or (".lora_A." in key and shape[1] != in_f)
        or (".lora_B." in key and shape[0] != out_f)
    ):
        raise ValueError(
            f"{filename}: key {key!r} has shape {shape}, which does not fit the base layer {tuple(weight.shape)} "
            "(LoRA for another base model?)"
        )
