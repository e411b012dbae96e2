"""Silence third-party console lines known to be harmless in the situation at hand, at their source."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


@contextlib.contextmanager
def dropped_log_messages(logger_name: str, *fragments: str) -> Iterator[None]:
    """While the block runs, records of logger ``logger_name`` containing any of ``fragments``
    are dropped; every other record of that logger still shows."""
    logger = logging.getLogger(logger_name)
    drop = _DropMessages(fragments)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextlib.contextmanager
def datasets_progress_off() -> Iterator[None]:
    """No ``datasets`` progress bars while the block runs (restored afterwards): reading a local
    folder draws "Downloading data: 150/150 files", which reads as if it went to the network."""
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()
