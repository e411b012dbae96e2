"""Errors as people read them: one line each."""

from __future__ import annotations


def one_line(err: BaseException) -> str:
    """The error's message on one line: a multi-line message (a library's, with its own line
    breaks and indents) joined by single spaces."""
    return " ".join(str(err).split())
