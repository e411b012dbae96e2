"""One writer per output folder: a lock file naming the process that writes there.

A training run or a merge holds ``<folder>/.reslora.lock`` while it writes into the folder; a
second one started into the same folder is refused with one line naming the folder and the
owner (pid, host, start time). The lock file is created with ``O_EXCL``, so of two processes
starting at once exactly one gets it. A lock whose process is gone (``kill -9``, a crash, a
reboot) is stale: on the same host that is decided from the pid (and the process's start time,
so a reused pid does not count), and the lock is taken over with a warning. A lock of another
host (a shared network folder) cannot be checked and is always refused; the message says which
file to delete once that run is known to be over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .io import is_temporary, missing_ancestor, remove_empty_folders

logger = logging.getLogger(__name__)

LOCK_FILE = ".reslora.lock"
#: a lock file that stays empty or unreadable this long was left by a writer that died
_WRITE_GRACE_S = 1.0
#: a takeover (read, compare, remove: milliseconds) still marked after this long has died
_TAKEOVER_STALE_S = 10.0


class FolderInUseError(ValueError):
    """The folder is locked by a run that is still going (or by another host)."""


def user_entries(folder: str | Path) -> list[str]:
    """Names in ``folder`` other than the temporaries of writes in progress, the lock and, at a
    mount point, the ``lost+found`` folder that ext2/3/4 file systems have at their root: what
    tells whether the folder already holds outputs."""
    system = {"lost+found"} if os.path.ismount(folder) else set()
    return sorted(
        p.name
        for p in Path(folder).iterdir()
        if not (is_temporary(p) or p.name.startswith(LOCK_FILE) or p.name in system)
    )


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat``), None
    where it cannot be read: with the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count from the last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def _alive(owner: dict) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    started = owner.get("process_start")
    return started is None or process_start(pid) in (None, started)


def _read(lock: Path) -> dict | None:
    """The lock's record; None where it is gone or not (yet) complete JSON."""
    try:
        record = json.loads(lock.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _describe(owner: dict | None) -> str:
    if owner is None:
        return "a process whose lock file is unreadable"
    return f"pid {owner.get('pid')} on host {owner.get('host')}, since {owner.get('started')}"


def _create(lock: Path, record: dict) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record) + "\n")
    return True


def _owner(lock: Path) -> dict | None:
    """The record of an existing lock, waiting briefly for one that is being written; None if it
    vanished, ``{}`` if it stays unreadable."""
    deadline = time.monotonic() + _WRITE_GRACE_S
    while True:
        record = _read(lock)
        if record is not None or not lock.exists():
            return record
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.05)


def _stale(owner: dict) -> bool:
    """Whether the lock's process is known to be gone (only decidable on this host)."""
    if not owner:
        return True  # its writer died before finishing the record
    return owner.get("host") == socket.gethostname() and not _alive(owner)


def _take_over(lock: Path, owner: dict) -> bool:
    """Remove the stale lock whose record is ``owner``; whether it was removed.

    Only the holder of a second lock file (``.reslora.lock.takeover``, created with ``O_EXCL``)
    may remove a stale lock, and only after reading the same record again: of several processes
    that found the same stale lock, one removes it, and none can remove a live lock that another
    one created meanwhile (a lock disappears only by its owner's release or by this step).
    """
    mutex = lock.with_name(f"{LOCK_FILE}.takeover")
    try:
        os.close(os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - mutex.stat().st_mtime > _TAKEOVER_STALE_S:
                mutex.unlink()  # left by a process that died while taking over
        time.sleep(0.05)
        return False
    try:
        record = _read(lock)
        if record is None and not lock.exists():
            return False  # released meanwhile
        if (record or {}) != owner:
            return False  # replaced meanwhile
        lock.unlink()
        return True
    finally:
        mutex.unlink(missing_ok=True)


def _acquire(folder: Path, lock: Path, record: dict, flag: str) -> None:
    for _ in range(50):
        if _create(lock, record):
            return
        owner = _owner(lock)
        if owner is None:  # released meanwhile
            continue
        if not _stale(owner):
            raise FolderInUseError(
                f"{flag} {folder} is in use by another run ({_describe(owner)}): wait for it to end or "
                f"choose another folder (if that run is over, delete {lock})"
            )
        if _take_over(lock, owner):
            logger.warning(
                "%s: taking over the lock of %s, which is no longer running", folder, _describe(owner or None)
            )
    raise FolderInUseError(f"{flag} {folder}: could not take its lock {lock}; other runs keep starting there")


def _release(lock: Path, token: str) -> None:
    record = _read(lock)
    if record is not None and record.get("token") == token:
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_lock(folder: str | Path, flag: str = "--output_dir", command: str = "") -> Iterator[Path]:
    """Hold the lock of ``folder`` (created if missing) while the block writes there.

    Raises :class:`FolderInUseError` (one line naming ``flag``, the folder and the owner's pid and
    host) while another live process holds it; a stale lock is taken over with a warning. On
    exit the lock is removed, and so is ``folder`` if this call created it and it is still empty.
    """
    folder = Path(folder)
    created = missing_ancestor(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    token = secrets.token_hex(8)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_start": process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command,
        "token": token,
    }
    try:
        _acquire(folder, lock, record, flag)
    except BaseException:
        if created is not None:
            remove_empty_folders(folder, created)
        raise
    try:
        yield lock
    finally:
        _release(lock, token)
        if created is not None:
            remove_empty_folders(folder, created)
