"""Check a LoRA file against a pipeline before loading it, with errors a person can act on, and load it.

The file's format is the registered one (:mod:`.formats`) whose keys it holds; the format
checks the keys against the pipeline and loads them.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..utils.quiet import NO_KEYS_FOR_COMPONENT, dropped_log_messages
from ..utils.safety import check_finite_file
from .diffusers import DIFFUSERS_FILE
from .formats import LoRAFormat, format_of, lora_formats


def resolve_lora_file(path: str | Path) -> Path:
    """A ``.safetensors`` file, or a training/export folder holding ``pytorch_lora_weights.safetensors``."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    return path


def _key_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path.name} is not a safetensors file ({err})") from err


def _checked(pipe, path: str | Path) -> tuple[Path, LoRAFormat]:
    """The file and its format, once the format found every key fitting ``pipe``."""
    path = resolve_lora_file(path)
    shapes = _key_shapes(path)
    fmt = format_of(shapes)
    if fmt is None:
        names = " or ".join(f.key_names for f in lora_formats())
        raise ValueError(f"{path.name} holds no LoRA weights (no {names} keys)")
    fmt.check(pipe, path.name, shapes)
    return path, fmt


def check_lora_file(pipe, path: str | Path) -> Path:
    """Raise ``ValueError`` naming the first key of ``path`` that does not fit ``pipe``.

    diffusers-format keys (``unet.<module>.lora_A.weight``...) are checked module by module
    (it must exist and ``A`` must be ``(r, in)``, ``B`` ``(out, r)``, with kernel dimensions for
    convolutions); kohya-format files are accepted when they hold kohya LoRA keys for components
    the pipeline has (diffusers' converter checks their layers on load); a file of another
    registered format is checked by its format.
    """
    return _checked(pipe, path)[0]


def load_lora_file(pipe, path: str | Path) -> Path:
    """Load the LoRA ``path`` (a file, or a folder holding ``pytorch_lora_weights.safetensors``)
    into ``pipe`` as any user of the file loads it (diffusers' ``load_lora_weights`` for the
    diffusers and kohya files), after :func:`check_lora_file` and a check for NaN or infinite
    weights (which would draw black images). diffusers' warning for each component the file has
    no keys for (the text encoders of a UNet-only LoRA) is dropped: every key the file holds was
    checked. Returns the file."""
    path, fmt = _checked(pipe, path)
    check_finite_file(path)
    with dropped_log_messages(*NO_KEYS_FOR_COMPONENT):
        fmt.load(pipe, path)
    return path


def lora_file_components(path: str | Path) -> set[str]:
    """The pipeline components the LoRA ``path`` (a file or a run folder) holds weights for
    (empty for a file of no registered format)."""
    keys = _key_shapes(resolve_lora_file(path))
    fmt = format_of(keys)
    return fmt.components(keys) if fmt else set()
