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
from ..utils.safety import json_field, open_safetensors, safetensors_size
from .config import ResLoRAConfig
from .inject import attach_reslora, get_state, has_reslora

FORMAT = "reslora-checkpoint"
VERSION = "1"
TENSORS = ("lora_A", "lora_B", "norm_window", "norm_count", "shortcut_scale")
#: tensors that older checkpoints lack, and the value they load as (the paper's full shortcut)
OPTIONAL = {"shortcut_scale": 1.0}
#: config fields that decide what the stored tensors compute: a model whose ResLoRA has other
#: values gives other outputs from the same tensors (``pre_num`` only for types that read it)
MODEL_FIELDS = ("res_type", "pre_num", "rank", "alpha", "target_modules")

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
    with atomic_path(path, needed=safetensors_size(tensors, meta)) as tmp:
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
    ``add_reslora`` for models with presets and processors). A model that already has ResLoRA
    must have the stored ``res_type``, ``pre_num``, ``rank``, ``alpha`` and targets
    (:data:`MODEL_FIELDS`) and, where it has traced its chains, the stored chain structure: the
    same tensors under another config compute another model, so a mismatch raises ``ValueError``
    naming the field or chain before anything is loaded. Every tensor must match a block
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
            if has_reslora(model):
                where = f"{path}: " + (f"component {name!r} " if name else "")
                check_model_config(model, configs[name], chains.get(name, {}), where)
            else:
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


def check_model_config(model: nn.Module, stored: dict, chains: dict[str, dict], where: str = "") -> None:
    """Refuse (``ValueError`` naming the field or chain) a model whose ResLoRA differs from the
    stored config ``stored`` in a :data:`MODEL_FIELDS` field, or whose traced chains differ from
    the stored structure ``chains`` (``{chain: {"modules": [...], "links": [...]}}``)."""
    state = get_state(model)
    saved = ResLoRAConfig.from_dict(stored)
    for field in MODEL_FIELDS:
        if field == "pre_num" and not state.shortcut.uses_pre_num:
            continue  # reached only with equal res_type: a type without pre_num ignores it
        mine, theirs = getattr(state.config, field), getattr(saved, field)
        if field == "target_modules":
            mine, theirs = sorted(mine or []), sorted(theirs or [])
        if mine != theirs:
            raise ValueError(
                f"{where}saved with {field}={getattr(saved, field)!r}, the model's ResLoRA has "
                f"{field}={getattr(state.config, field)!r} (load it into a model without ResLoRA to "
                "use the checkpoint's own config)"
            )
    for key, info in chains.items():
        chain = state.chains.get(key)
        if chain is None or not chain.frozen:
            continue
        saved_blocks = list(zip(info["modules"], map(bool, info["links"])))
        traced = [(b.module_path, bool(link)) for b, link in zip(chain.blocks, chain.links)]
        if saved_blocks != traced:
            pos = next((i for i, (x, y) in enumerate(zip(saved_blocks, traced)) if x != y), None)
            if pos is None:
                pos = min(len(saved_blocks), len(traced))
            raise ValueError(
                f"{where}chain {key!r} differs from the model's traced chain at block {pos}: saved "
                f"{_block_text(saved_blocks, pos)}, traced {_block_text(traced, pos)}"
            )


def _block_text(blocks: list[tuple[str, bool]], pos: int) -> str:
    if pos >= len(blocks):
        return f"no block {pos} ({len(blocks)} blocks)"
    module, link = blocks[pos]
    return f"{module!r} ({'linked to' if link else 'not linked to'} the block before)"


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
