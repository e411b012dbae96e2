"""Checks that keep broken weights and damaged files from passing as good ones.

Every helper raises ``ValueError`` with one line that names the file and, where there is
one, the first offending key, so the command-line tools can print it as their error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from .io import atomic_path


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first key (in sorted order) whose floating-point tensor holds a NaN or an infinity."""
    for key in sorted(tensors):
        value = tensors[key]
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse tensors with NaN or infinite values; ``what`` names the file or object they are for."""
    key = first_non_finite(tensors)
    if key is not None:
        raise ValueError(
            f"{what}: tensor {key!r} holds NaN or infinite values (training diverged? "
            "try a lower --learning_rate or --max_grad_norm 1)"
        )


def safetensors_size(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> int:
    """Bytes of the safetensors file of ``tensors``: their data plus the JSON header (its
    exact length varies with the offsets' digits; 128 bytes per tensor is more than enough)."""
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    header = sum(128 + len(k) for k in tensors) + len(json.dumps(dict(metadata or {})))
    return data + header


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write a safetensors file after checking every tensor is finite; atomic (a temporary name,
    renamed when complete), with the permissions the user's umask gives new files, and refused
    in one line (``DiskFullError``) where the disk lacks the room."""
    from safetensors.torch import save_file

    path = Path(path)
    check_finite(tensors, str(path))
    with atomic_path(path, needed=safetensors_size(tensors, metadata)) as tmp:
        save_file(dict(tensors), str(tmp), metadata=metadata)
    return path


@contextmanager
def open_safetensors(path: str | Path) -> Iterator:
    """``safetensors.safe_open`` whose failures on a truncated, random or unreadable file are one
    ``ValueError`` naming the file (a missing file stays ``FileNotFoundError``)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file (damaged or truncated?): {err}") from err
    with handle as f:
        yield f


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, with the errors of :func:`open_safetensors`."""
    from safetensors import SafetensorError

    with open_safetensors(path) as f:
        try:
            return {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ValueError(f"{path}: a tensor cannot be read (damaged file?): {err}") from err


def check_finite_file(path: str | Path) -> None:
    """Refuse a safetensors file that is damaged or holds NaN or infinite weights."""
    check_finite(load_safetensors(path), str(path))


def json_field(metadata: Mapping[str, str], field: str, path: str | Path):
    """Parse the JSON text of a metadata field, naming the file and field when it is missing or broken."""
    if field not in metadata:
        raise ValueError(f"{path}: metadata field {field!r} is missing")
    try:
        return json.loads(metadata[field])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata field {field!r} is not valid JSON ({err})") from err
