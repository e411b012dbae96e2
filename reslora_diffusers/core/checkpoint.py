"""The ResLoRA checkpoint: one safetensors file with every block's A, B, norm window and
shortcut scale, and the config, chain structure and shared-input groups in its JSON metadata.

Keys are ``[<component>.]<module path>.<lora_A|lora_B|norm_window|norm_count|shortcut_scale>``; a
checkpoint of several models (a pipeline's UNet and text encoders) prefixes each with its
component name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..utils.io import atomic_path
from ..utils.safety import json_field, open_safetensors
from .config import ResLoRAConfig
from .inject import attach_reslora, get_state, has_reslora

FORMAT = "reslora-checkpoint"
VERSION = "1"
TENSORS = ("lora_A", "lora_B", "norm_window", "norm_count", "shortcut_scale")
#: tensors that older checkpoints lack, and the value they load as (the paper's full shortcut)
OPTIONAL = {"shortcut_scale": 1.0}

Models = nn.Module | dict[str, nn.Module]


def _components(models: Models) -> dict[str, nn.Module]:
    return {"": models} if isinstance(models, nn.Module) else dict(models)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def checkpoint_state(models: Models) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata that :func:`save_reslora_checkpoint` writes."""
    tensors, configs, chains, groups = {}, {}, {}, {}
    for name, model in _components(models).items():
        state = get_state(model)
        configs[name] = state.config.to_dict()
        chains[name] = {
            key: {"modules": [b.module_path for b in c.blocks], "links": [bool(x) for x in c.links]}
            for key, c in state.chains.items()
            if c.frozen
        }
        if state.inputs.traced:
            groups[name] = state.inputs.describe()
        for path, block in state.blocks.items():
            for t in TENSORS:
                tensors[f"{_prefix(name)}{path}.{t}"] = getattr(block, t).detach().contiguous().cpu()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "configs": json.dumps(configs),
        "chains": json.dumps(chains),
        "input_groups": json.dumps(groups),
    }
    return tensors, meta


def save_reslora_checkpoint(models: Models, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the checkpoint of ``models`` (a model or ``{component: model}``) to ``path``, atomically."""
    tensors, meta = checkpoint_state(models)
    meta.update(metadata or {})
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_checkpoint_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ResLoRA checkpoint not found: {path}")
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ResLoRA checkpoint (metadata format={meta.get('format')!r})")
    return meta


def checkpoint_configs(path: str | Path) -> dict[str, ResLoRAConfig]:
    """``{component: ResLoRAConfig}`` stored in a checkpoint (component ``""`` for one model)."""
    meta = read_checkpoint_metadata(path)
    return {k: ResLoRAConfig.from_dict(v) for k, v in json_field(meta, "configs", path).items()}


def load_checkpoint(
    models: Models,
    path: str | Path,
    attach: Callable[[nn.Module, ResLoRAConfig], nn.Module] = attach_reslora,
) -> Models:
    """Load a checkpoint into ``models``, attaching ResLoRA with the stored config where missing.

    ``attach(model, config)`` adds ResLoRA to a model that has none (the front end's
    ``add_reslora`` for models with presets and processors). Every tensor must match a block
    of the model in name and shape, and every block must be in the file; the first key that
    does not fit raises ``ValueError`` naming it. The stored chain structure and shared-input
    groups are installed, so no traced forward is needed afterwards (a checkpoint without groups,
    from before they existed, has them traced by the next forward).
    """
    path = Path(path)
    meta = read_checkpoint_metadata(path)
    configs = json_field(meta, "configs", path)
    chains = json_field(meta, "chains", path)
    groups = json_field(meta, "input_groups", path) if "input_groups" in meta else {}
    comps = _components(models)
    missing = sorted(set(configs) - set(comps))
    if missing:
        raise ValueError(f"{path}: checkpoint has component {missing[0]!r}, not given to load into")
    with open_safetensors(path) as f:
        keys = set(f.keys())
        expected = {}
        for name, model in comps.items():
            if name not in configs:
                continue
            if not has_reslora(model):
                attach(model, ResLoRAConfig.from_dict(configs[name]))
            for bpath, block in get_state(model).blocks.items():
                for t in TENSORS:
                    expected[f"{_prefix(name)}{bpath}.{t}"] = getattr(block, t)
        for key in sorted(keys):
            if key not in expected:
                raise ValueError(f"{path}: key {key!r} has no matching ResLoRA module in the model")
        for key, target in expected.items():
            if key not in keys:
                if key.rpartition(".")[2] not in OPTIONAL:
                    raise ValueError(f"{path}: key {key!r} is missing from the checkpoint")
                continue
            shape = tuple(f.get_slice(key).get_shape())
            if shape != tuple(target.shape):
                raise ValueError(
                    f"{path}: key {key!r} has shape {shape}, the model expects {tuple(target.shape)}"
                )
        with torch.no_grad():
            for key, target in expected.items():
                if key in keys:
                    target.copy_(f.get_tensor(key))
                else:
                    target.fill_(OPTIONAL[key.rpartition(".")[2]])
    for name, model in comps.items():
        if name in configs:
            _install_chains(model, chains.get(name, {}))
            if name in groups:
                _install_groups(model, groups[name])
    return models


def _install_chains(model: nn.Module, chains: dict[str, dict]) -> None:
    state = get_state(model)
    for key, info in chains.items():
        if key in state.chains and all(m in state.blocks for m in info["modules"]):
            state.chains[key].set_structure([state.blocks[m] for m in info["modules"]], info["links"])


def _install_groups(model: nn.Module, groups: list[list[str]]) -> None:
    state = get_state(model)
    state.inputs.set_structure(
        [[state.blocks[m] for m in members] for members in groups if all(m in state.blocks for m in members)]
    )
