"""``none``: plain LoRA through the same code, ``h_n = W_n x_n + s B_n A_n x_n``."""

from __future__ import annotations

from . import register_shortcut
from .base import Shortcut


@register_shortcut
class NoShortcut(Shortcut):
    """No shortcut: every block is a plain LoRA branch (the base class's behaviour)."""

    name = "none"
