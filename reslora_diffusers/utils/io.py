"""Atomic file output: write under a temporary name on the destination's filesystem, rename when
complete; a disk that fills up is one error naming the file and the space it needs.

The temporary name always lives where the rename needs it: beside a file, inside a folder. A
folder that is a mount point (a Docker volume, a network share, a tmpfs) is on another
filesystem than its parent, and a rename across filesystems fails (``EXDEV``); where one still
has to cross (a sub-folder that is itself a mount), :func:`replace` copies to a temporary name on
the destination's side and renames that.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

#: temporary names are ``.<final name>.<random>.tmp``, beside a file or inside a folder
TEMP_SUFFIX = ".tmp"
#: a write that fails with less than this free is taken for a full disk: torch's writer reports
#: one only as "file write failed" or "unexpected pos"
FULL_DISK_MARGIN = 1 << 20
_FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_DISK_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


class DiskFullError(OSError):
    """A write the disk has no room for: its message is one line naming the file and the space
    it needs."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def free_space(path: str | Path) -> int:
    """Bytes a normal user may still write on the filesystem of ``path`` (of its nearest existing
    folder when it does not exist yet)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def _size(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from or during."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__]


def _says_disk_full(err: BaseException) -> bool:
    return any(
        (isinstance(e, OSError) and e.errno in _FULL_DISK_ERRNOS) or any(t in str(e) for t in _FULL_DISK_TEXT)
        for e in _causes(err)
    )


def _failed_file(err: BaseException, written: Path) -> Path | None:
    """The file inside the folder ``written`` (absolute) that the failing write names
    (``OSError.filename``), if any: otherwise the newest file there, the one being filled when
    the disk ran out."""
    root = written.absolute()
    for e in _causes(err):
        name = getattr(e, "filename", None) if isinstance(e, OSError) else None
        if isinstance(name, (str, os.PathLike)) and Path(os.path.abspath(name)).is_relative_to(root):
            return Path(os.path.abspath(name))
    files = [p for p in root.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


def check_free_space(target: str | Path, needed: int) -> None:
    """Refuse (``DiskFullError``) to write ``needed`` bytes to ``target`` where its disk has less free."""
    free = free_space(target)
    if needed > free:
        raise DiskFullError(
            f"{target}: not enough disk space: writing it needs {_megabytes(needed)}, {_megabytes(free)} free"
        )


@contextlib.contextmanager
def disk_space(target: str | Path, written: str | Path, needed: int | None = None) -> Iterator[None]:
    """Turn a write that runs out of disk space into one :class:`DiskFullError`.

    ``target`` is the final file or folder, ``written`` the temporary file or folder being filled
    (the error names the file in it that failed, by its place in ``target``), ``needed`` the
    bytes the write takes where known: then it is also checked before the block runs. A failure
    that says ``ENOSPC`` (or a quota), or any failure with less than ``FULL_DISK_MARGIN`` left
    free, is a full disk.
    """
    target, written = Path(target), Path(written)
    if needed is not None:
        check_free_space(target, needed)
    try:
        yield
    except DiskFullError as err:
        if str(written) not in str(err):
            raise
        # a write inside the temporary file or folder: name the final one, as the user knows it
        raise DiskFullError(str(err).replace(str(written), str(target))) from err
    except Exception as err:
        free = free_space(written)
        if not (_says_disk_full(err) or free < FULL_DISK_MARGIN):
            raise
        name = target
        failed = _failed_file(err, written) if written.is_dir() else None
        if failed is not None:
            name = target / failed.relative_to(written.absolute())
        if needed:
            need = f"{_megabytes(needed)}, {_megabytes(free)} free"
        else:  # what was written before the disk filled, and what was still free then
            need = f"more than the {_megabytes(_size(written) + free)} that were free"
        raise DiskFullError(f"{name}: the disk is full: writing it needs {need}") from err


@contextlib.contextmanager
def atomic_path(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    On error the temporary file is removed and ``path`` is left as it was; a full disk is a
    :class:`DiskFullError` (``needed``: the file's size where known, checked first). The file gets
    the permissions of any new file under the user's umask (``mkstemp`` alone would make it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with disk_space(path, tmp, needed):
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())
            replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder inside ``path``; on success its files are moved into ``path``.

    The temporary folder (``.<name>.<random>.tmp``, which listings of outputs skip) is on the
    filesystem of ``path`` even where ``path`` is a mount point, so the moves are renames. Nothing
    but that folder is written to ``path`` unless the block completes, so a failed export never
    leaves partial files there (and a ``path`` created for it is removed again). Files of the same
    name are replaced; files of ``path`` that the block did not write are kept, in sub-folders
    too. A full disk is a :class:`DiskFullError` (``needed``: the bytes written where known).
    """
    path = Path(path)
    created = missing_ancestor(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path))
    done = False
    try:
        with disk_space(path, tmp, needed):
            yield tmp
            _move_into(tmp, path)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done and created is not None:
            remove_empty_folders(path, created)


def missing_ancestor(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (None: it exists)."""
    missing = None
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing


def remove_empty_folders(path: Path, up_to: Path) -> None:
    """Remove ``path`` and its parents up to ``up_to`` while they are empty."""
    while True:
        try:
            path.rmdir()
        except OSError:
            return
        if path == up_to:
            return
        path = path.parent


def _move_into(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        target = dest / item.name
        if item.is_dir() and target.is_dir() and not target.is_symlink():
            _move_into(item, target)
        else:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)  # a folder where the output now has a file of that name
            replace(item, target)


def replace(src: str | Path, dest: str | Path) -> None:
    """``os.replace(src, dest)``; where the two are on different filesystems (``EXDEV``), copy
    ``src`` to a temporary name beside ``dest``, rename that over ``dest`` and remove ``src``:
    either way ``dest`` is never seen half-written."""
    src, dest = Path(src), Path(dest)
    try:
        os.replace(src, dest)
        return
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
    holder = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=TEMP_SUFFIX, dir=dest.parent))
    try:
        copy = holder / dest.name
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, copy, symlinks=True)
        else:
            shutil.copy2(src, copy, follow_symlinks=False)
        os.replace(copy, dest)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    if src.is_dir() and not src.is_symlink():
        shutil.rmtree(src)
    else:
        src.unlink()
    logger.debug("moved %s to %s by copying (another filesystem)", src, dest)


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
