"""Progress bars of third-party libraries that mislead during training, switched off at their source
(log messages: :mod:`reslora_diffusers.utils.quiet`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


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
