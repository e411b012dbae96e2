"""Shortcut types and their registry.

``res_type`` names a registered :class:`Shortcut` subclass. The four types of the paper
(``none``, ``is``, ``bs``, ``ms``) register themselves here; a new type is one subclass
(see :mod:`.base` for the contract) and one call::

    @register_shortcut
    class MyShortcut(ActivationShortcut):
        name = "xs"
        ...
"""

from __future__ import annotations

from .base import ActivationShortcut, CalibrationTerm, MergeContext, Shortcut, check_cached

_REGISTRY: dict[str, type[Shortcut]] = {}


def register_shortcut(cls: type[Shortcut]) -> type[Shortcut]:
    """Make ``cls`` available as ``ResLoRAConfig(res_type=cls.name)``; usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Shortcut)):
        raise TypeError(f"register_shortcut expects a Shortcut subclass, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name:
        raise ValueError(f"{cls.__name__}.name must be a non-empty string")
    known = _REGISTRY.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"res_type {cls.name!r} is registered already (by {known.__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def res_types(*, uses_pre_num: bool | None = None, exact_merge: bool | None = None) -> tuple[str, ...]:
    """The registered ``res_type`` names, in registration order; only those whose class has the
    given ``uses_pre_num`` / ``exact_merge`` where one is given (for messages and help texts)."""
    return tuple(
        name
        for name, cls in _REGISTRY.items()
        if uses_pre_num in (None, cls.uses_pre_num) and exact_merge in (None, cls.exact_merge)
    )


def get_shortcut(res_type: str, pre_num: int) -> Shortcut:
    """An instance of the shortcut type ``res_type`` for ``pre_num`` earlier blocks."""
    if res_type not in _REGISTRY:
        raise ValueError(f"unknown res_type {res_type!r}; allowed: {' | '.join(_REGISTRY)}")
    return _REGISTRY[res_type](pre_num)


# The built-in types register on import, in the order of the paper's table.
from . import none, input, block, middle  # noqa: E402, F401, I001

__all__ = [
    "ActivationShortcut",
    "CalibrationTerm",
    "MergeContext",
    "Shortcut",
    "check_cached",
    "get_shortcut",
    "register_shortcut",
    "res_types",
]
