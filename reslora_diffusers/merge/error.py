"""How far a merged plain LoRA is from the ResLoRA model: running batches and comparing outputs."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

from ..core import get_state
from ..core.keys import lora_key

Batch = torch.Tensor | tuple | list | dict


def run_batch(model: nn.Module, batch: Batch):
    """Call ``model`` the way calibration and evaluation batches are specified."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def output_tensor(out) -> torch.Tensor:
    """The main tensor of a model output (a tensor, ``.sample``, ``.logits``, a dict or tuple);
    where that is a list of one tensor per sample (Z-Image's transformer), the list stacked."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("sample", "logits", "last_hidden_state"):
        value = _tensor_of(getattr(out, attr, None))
        if value is not None:
            return value
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and _tensor_of(out[0]) is not None:
        return _tensor_of(out[0])
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")


def _tensor_of(value) -> torch.Tensor | None:
    """``value`` if a tensor, a list of tensors stacked, else None."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
        return torch.stack(value)
    return None


@contextlib.contextmanager
def merged_view(model: nn.Module, merged: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, adapted layers compute ``W x + B' A' x`` from ``merged`` (no shortcuts)."""
    blocks = get_state(model).blocks
    try:
        for path, block in blocks.items():
            if lora_key(path, "A") in merged:
                block.use_factors((merged[lora_key(path, "A")], merged[lora_key(path, "B")]))
        yield
    finally:
        for block in blocks.values():
            block.use_factors(None)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def reference_outputs(model: nn.Module, inputs: Iterable[Batch]) -> list[torch.Tensor]:
    """The ResLoRA model's outputs (eval mode, float64) on ``inputs``."""
    with eval_mode(model):
        return [output_tensor(run_batch(model, batch)).double() for batch in inputs]


def relative_error(
    model: nn.Module,
    merged: dict[str, torch.Tensor],
    inputs: Iterable[Batch],
    reference: list[torch.Tensor] | None = None,
) -> float:
    """``||y_merged - y_reslora|| / ||y_reslora||`` over all batches (norms summed in squares).

    ``reference`` (from :func:`reference_outputs` on the same inputs) saves recomputing ``y_reslora``.
    """
    inputs = list(inputs)
    reference = reference if reference is not None else reference_outputs(model, inputs)
    num = den = 0.0
    with eval_mode(model), merged_view(model, merged):
        for batch, ref in zip(inputs, reference, strict=True):
            got = output_tensor(run_batch(model, batch)).double()
            num += float((got - ref).square().sum())
            den += float(ref.square().sum())
    if not (math.isfinite(num) and math.isfinite(den)):
        return math.nan  # NaN/Inf outputs: never report them as a perfect merge
    return math.sqrt(num / den) if den > 0 else 0.0
