"""Output folders on another filesystem: a real tmpfs where the tests may mount one, and a
simulated one (``os.replace`` and ``os.rename`` refusing to cross into or out of a folder with
``EXDEV``, as the kernel does at a mount point) that runs everywhere."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "200m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block; the test is skipped, saying why,
    where this process may not mount one (it needs root or CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a tmpfs (the simulated cross-device tests still run)")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}); mounting needs root "
            "or CAP_SYS_ADMIN (the simulated cross-device tests still run)"
        )
    try:
        assert os.stat(path).st_dev != os.stat(path.parent).st_dev
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, leave: int) -> None:
    """Fill the filesystem of ``folder`` up to ``leave`` free bytes, growing one file."""
    remaining = shutil.disk_usage(folder).free - leave
    chunk = b"\0" * (1 << 20)
    with open(folder / "filler.bin", "ab") as f:
        while remaining > 0:
            remaining -= f.write(chunk[: min(remaining, len(chunk))])
    assert shutil.disk_usage(folder).free <= leave + 8192


def simulate_mount(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[tuple[str, str]]:
    """Make ``root`` behave as another filesystem for renames: ``os.replace`` and ``os.rename``
    between a path inside it and one outside raise ``EXDEV``. Returns the refused moves."""
    refused = []
    real_replace, real_rename = os.replace, os.rename
    root = Path(os.path.abspath(root))

    def inside(path) -> bool:
        return Path(os.path.abspath(os.fspath(path))).is_relative_to(root)

    def checked(real):
        def move(src, dst, *args, **kwargs):
            if inside(src) != inside(dst):
                refused.append((os.fspath(src), os.fspath(dst)))
                raise OSError(errno.EXDEV, "Invalid cross-device link", os.fspath(src), None, os.fspath(dst))
            return real(src, dst, *args, **kwargs)

        return move

    monkeypatch.setattr(os, "replace", checked(real_replace))
    monkeypatch.setattr(os, "rename", checked(real_rename))
    return refused
