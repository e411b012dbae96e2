"""The paper's formulas (DESIGN §1), written out once for every test, independent of the library.

Forward hooks on a plain copy of the base model add, at each adapted module ``n`` of a chain,
``s`` times the type's term to its output (``c``: the shortcut scale on every shortcut term)::

    none:  B_n A_n x_n
    is:    B_n A_n (x_n + c x_{n-1})
    bs:    B_n A_n x_n + c sum_{k=1..K} B_{n-k} A_{n-k} x_n
    ms:    B_n (A_n x_n + c sum_{k=1..K} A_{n-k} x_{n-k})

A chain is the modules of one role (the path after its last numeric component) in the order
they run in the pass; ``K`` is how many consecutive earlier modules are linked, at most
``pre_num`` (one for ``is``). A link ``n-1 -> n`` needs equal inputs for ``is``, equal factor
shapes for ``bs`` and equal ``A x`` shapes for ``ms``. ``A`` applies as a matrix product over
the last axis, or for a convolution as ``conv2d`` with the layer's kernel geometry (``bs``:
layer ``n``'s) followed by ``B`` as a 1 x 1 convolution.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


def role(path: str) -> str:
    """A module's role: its path after the last numeric component (``layers.3.proj`` -> ``proj``)."""
    return re.sub(r"^.*\.\d+\.", "", path)


def factors_of(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{path: (A, B)}`` of every adapted module of ``model`` (its ``lora_A``/``lora_B``)."""
    return {p: (m.lora_A, m.lora_B) for p, m in model.named_modules() if hasattr(m, "lora_A")}


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every adapted module replaced by the base layer it wraps."""
    plain = copy.deepcopy(model)
    for path in factors_of(model):
        parent, _, name = path.rpartition(".")
        owner = plain.get_submodule(parent) if parent else plain
        setattr(owner, name, copy.deepcopy(model.get_submodule(path).base_layer))
    return plain


def _apply_a(module: nn.Module, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if a.ndim == 4:  # a convolution's A: the layer's kernel, stride, padding and dilation
        return F.conv2d(x, a, stride=module.stride, padding=module.padding, dilation=module.dilation)
    return x @ a.T


def _apply_b(b: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    return F.conv2d(mid, b) if b.ndim == 4 else mid @ b.T


@contextlib.contextmanager
def reference_hooks(
    plain: nn.Module,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    s: float,
    res_type: str,
    pre_num: int,
    c: float = 1.0,
) -> Iterator[nn.Module]:
    """``plain`` computing the ResLoRA model of ``factors`` (module doc) inside the block."""
    runs: dict[str, list[tuple[str, torch.Tensor]]] = {}  # per role: (path, input) in this pass
    limit = {"none": 0, "is": 1}.get(res_type, pre_num)

    def ax(path: str, x: torch.Tensor, geometry: str | None = None) -> torch.Tensor:
        return _apply_a(plain.get_submodule(geometry or path), factors[path][0], x)

    def linked(earlier: tuple[str, torch.Tensor], later: tuple[str, torch.Tensor]) -> bool:
        (p, xp), (q, xq) = earlier, later
        if res_type == "is":
            return xp.shape == xq.shape
        if res_type == "bs":
            return all(u.shape == v.shape for u, v in zip(factors[p], factors[q]))
        return ax(p, xp).shape == ax(q, xq).shape

    def add_term(path: str):
        def hook(module, args, out):
            x = args[0]
            seq = runs.setdefault(role(path), [])
            preds, later = [], (path, x)
            for earlier in reversed(seq):
                if len(preds) == limit or not linked(earlier, later):
                    break
                preds.append(earlier)
                later = earlier
            seq.append((path, x))
            b = factors[path][1]
            if res_type == "is" and preds:
                term = _apply_b(b, ax(path, x + c * preds[0][1]))
            elif res_type == "bs":
                term = _apply_b(b, ax(path, x))
                for p, _ in preds:
                    term = term + c * _apply_b(factors[p][1], ax(p, x, geometry=path))
            elif res_type == "ms":
                term = _apply_b(b, ax(path, x) + c * sum(ax(p, xp) for p, xp in preds))
            else:
                term = _apply_b(b, ax(path, x))
            return out + s * term

        return hook

    handles = [plain.register_forward_pre_hook(lambda module, args: runs.clear())]
    handles += [plain.get_submodule(p).register_forward_hook(add_term(p)) for p in factors]
    try:
        yield plain
    finally:
        for handle in handles:
            handle.remove()


def reference_output(
    model: nn.Module, *args, res_type: str, pre_num: int, s: float, c: float = 1.0, **kwargs
):
    """The output of the ResLoRA ``model`` (whose adapted modules hold ``base_layer``, ``lora_A``
    and ``lora_B``) on ``args``/``kwargs``, computed by the formulas on a plain copy."""
    with reference_hooks(plain_copy(model), factors_of(model), s, res_type, pre_num, c) as plain:
        return plain(*args, **kwargs)
