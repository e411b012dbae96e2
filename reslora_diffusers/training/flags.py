"""ResLoRA's command-line flags, generated from :class:`~reslora_diffusers.ResLoRAConfig`'s fields.

Each field's ``metadata`` (as PEFT's ``LoraConfig`` has) holds its help text, the flag's name
where it differs from the field's (``alpha`` is ``--lora_alpha``, as in diffusers' scripts) and
its choices; :func:`add_reslora_arguments` makes the flags and :func:`reslora_config` the
config back from the parsed flags, so ``train_text_to_image.py`` and the language-model
examples have the same flags with the same help. Help texts name the shortcut types from the
registry (``res_types()``), so a type added by a plugin is listed too: ``--shortcut_module``
imports such a module before the flags are built (:func:`import_shortcut_modules`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Iterable, Sequence
from dataclasses import Field, fields
from pathlib import Path

from ..core import ResLoRAConfig, res_types
from ..utils.errors import one_line

SHORTCUT_MODULE_HELP = (
    "a module (dotted name, or a .py file) that registers a shortcut type with register_shortcut, "
    "imported before --res_type is read; repeat for several"
)


def flag_name(f: Field) -> str:
    """The flag of a config field (``--<this>``)."""
    return f.metadata.get("flag", f.name)


def type_texts() -> dict[str, str]:
    """The placeholders of the fields' help texts: the registered types, all and by kind."""
    return {
        "all_types": " | ".join(res_types()),
        "pre_num_types": "/".join(res_types(uses_pre_num=True)),
        "approximate_types": "/".join(res_types(exact_merge=False)),
        "exact_types": ", ".join(res_types(exact_merge=True)),
    }


def _kwargs(f: Field, default, several: bool, help_text: str | None) -> dict:
    """``add_argument`` keywords of field ``f`` (its type from the annotation)."""
    kind = str(f.type)
    kwargs: dict = {"default": default, "help": help_text or f.metadata["help"].format(**type_texts())}
    choices = f.metadata.get("choices")
    if choices is not None:
        kwargs["choices"] = list(choices() if callable(choices) else choices)
    if kind.startswith("bool"):
        kwargs["action"] = "store_true"  # given: True; not given: the field's None ("when needed")
        kwargs.pop("choices", None)
        return kwargs
    if kind.startswith("list") or several:
        kwargs["nargs"] = "+"
    if kind.startswith(("int", "float")):
        kwargs["type"] = int if kind.startswith("int") else float
    return kwargs


def add_reslora_arguments(
    parser: argparse.ArgumentParser,
    *,
    defaults: dict | None = None,
    several: Iterable[str] = (),
    helps: dict[str, str] | None = None,
) -> None:
    """One flag per config field, and ``--shortcut_module``, on ``parser`` (or an argument group).

    Args:
        defaults: ``{flag: default}`` where the command's default is not the field's.
        several: flags that take several values (the examples compare several ``--res_type``).
        helps: ``{flag: help}`` replacing a field's help where the command says more.
    """
    defaults, several, helps = defaults or {}, set(several), helps or {}
    for f in fields(ResLoRAConfig):
        name = flag_name(f)
        default = defaults.get(name, f.default)
        parser.add_argument(f"--{name}", **_kwargs(f, default, name in several, helps.get(name)))
    parser.add_argument("--shortcut_module", action="append", default=[], help=SHORTCUT_MODULE_HELP)


def reslora_config(args: argparse.Namespace, **overrides) -> ResLoRAConfig:
    """The config of the parsed flags (``overrides``: field values to use instead, e.g. one of
    several ``--res_type``)."""
    values = {
        f.name: getattr(args, flag_name(f)) for f in fields(ResLoRAConfig) if hasattr(args, flag_name(f))
    }
    return ResLoRAConfig(**{**values, **overrides})


def import_shortcut_module(name: str) -> None:
    """Import a module by dotted name, or a ``.py`` file by path (``ValueError`` naming it)."""
    try:
        if name.endswith(".py"):
            path = Path(name)
            spec = importlib.util.spec_from_file_location(path.stem, path)
            if spec is None or not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(name)
    except (ImportError, OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"--shortcut_module {name}: cannot import it ({one_line(err)})") from err


def import_shortcut_modules(argv: Sequence[str] | None) -> None:
    """Import every ``--shortcut_module`` of ``argv`` (default ``sys.argv[1:]``), before a parser
    whose ``--res_type`` choices are the registered types is built; a failure is the parser's
    one-line error."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--shortcut_module", action="append", default=[])
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    for name in known.shortcut_module:
        try:
            import_shortcut_module(name)
        except ValueError as err:
            pre.error(str(err))
