"""Atomic file output: write under a temporary name, rename when complete."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

#: temporary names are ``.<final name>.<random>.tmp`` beside the final path
TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    On error the temporary file is removed and ``path`` is left as it was. The file gets the
    permissions of any new file under the user's umask (``mkstemp`` alone would make it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success its files are moved into ``path``.

    Nothing is written to ``path`` unless the block completes, so a failed export never
    leaves partial files there. Files of the same name are replaced; files of ``path`` that
    the block did not write are kept, in sub-folders too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        _move_into(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        target = dest / item.name
        if item.is_dir() and target.is_dir() and not target.is_symlink():
            _move_into(item, target)
        else:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)  # a folder where the output now has a file of that name
            os.replace(item, target)


def is_temporary(path: str | Path) -> bool:
    """A name :func:`atomic_path`, :func:`atomic_dir` or a checkpoint write uses while in progress."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove what a killed write into ``path`` left: ``.<name>.*.tmp`` beside it and, if it is a
    folder, the temporary entries inside it. Returns what was removed."""
    path = Path(path)
    found = list(path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}")) if path.parent.is_dir() else []
    if path.is_dir():
        found += [p for p in path.iterdir() if is_temporary(p)]
    for stale in found:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        logger.info("removed %s, left by an interrupted write", stale)
    return found
