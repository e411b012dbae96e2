"""Torch CPU threads that follow the CPUs other processes leave free.

On an oversubscribed CPU, torch's threads wait for each other at every parallel region: a
thread that was preempted by another process holds up the rest, and a two-thread step beside
one CPU-bound process costs several times the idle step. One thread per *free* CPU avoids
that without costing the idle case, where every CPU is free.

:class:`FreeCpuThreads` measures, over a window of a few seconds, the CPU time the machine
spent on the CPUs this process may run on, less the CPU time of this process itself:

    others = (Δ busy time of the allowed CPUs − Δ CPU time of this process) / Δ wall time
    free   = n_allowed − others
    threads = clamp(round(free), 1, torch's own choice at the start)

and calls ``torch.set_num_threads`` when the same new count comes out of two windows in a row
(one window of a short burst, such as a compiler or a file copy, changes nothing).

The busy times come from ``/proc/stat`` (Linux); elsewhere the controller does nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PROC_STAT = Path("/proc/stat")
#: ``/proc/stat`` columns after the CPU name: user nice system idle iowait irq softirq steal ...
_IDLE_COLUMNS = (3, 4)
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on (all of them where affinity is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def busy_seconds(cpus: set[int], stat: Path = PROC_STAT) -> float | None:
    """Seconds the CPUs ``cpus`` have spent busy since boot (user, system, irq, steal), from
    ``/proc/stat``; ``None`` where the file does not exist or lists none of them."""
    try:
        text = stat.read_text()
    except OSError:
        return None
    ticks, seen = 0, False
    for line in text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields]
        ticks += sum(values[i] for i in _BUSY_COLUMNS if i < len(values))
        seen = True
    return ticks / os.sysconf("SC_CLK_TCK") if seen else None


class FreeCpuThreads:
    """Keeps ``torch.get_num_threads()`` at the number of CPUs other processes leave free.

    Call :meth:`update` often (every training step): it reads the counters only once
    ``interval`` seconds have passed since the last reading, so the call is cheap.

    ``system_busy``, ``own_cpu`` and ``clock`` are the readings (seconds); the defaults read
    ``/proc/stat``, ``time.process_time`` and ``time.monotonic``.
    """

    def __init__(
        self,
        interval: float = 2.0,
        cpus: set[int] | None = None,
        system_busy: Callable[[], float | None] | None = None,
        own_cpu: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.cpus = allowed_cpus() if cpus is None else set(cpus)
        self._system_busy = system_busy or (lambda: busy_seconds(self.cpus))
        self._own_cpu = own_cpu
        self._clock = clock
        # never more than torch chose: it counts physical cores where hyperthreads double the CPUs
        self.max_threads = min(len(self.cpus), torch.get_num_threads())
        self._last = self._read()
        self._pending: int | None = None

    @property
    def available(self) -> bool:
        """Whether this platform exposes the system's busy time (Linux's ``/proc/stat``)."""
        return self._last is not None

    def _read(self) -> tuple[float, float, float] | None:
        busy = self._system_busy()
        return None if busy is None else (self._clock(), busy, self._own_cpu())

    def free_cpus(self, now: tuple[float, float, float]) -> float:
        """CPUs left free by other processes since the last reading (see the module doc)."""
        wall = now[0] - self._last[0]
        others = ((now[1] - self._last[1]) - (now[2] - self._last[2])) / wall
        return len(self.cpus) - max(0.0, others)

    def update(self) -> int | None:
        """Re-measure if a window has passed; returns the new thread count when it changed."""
        if self._last is None or self._clock() - self._last[0] < self.interval:
            return None
        now = self._read()
        if now is None:
            return None
        free = self.free_cpus(now)
        self._last = now
        target = min(self.max_threads, max(1, int(free + 0.5)))
        if target == torch.get_num_threads():
            self._pending = None
            return None
        if self._pending != target:  # the first window that asks for a change: wait for a second
            self._pending = target
            return None
        self._pending = None
        logger.info(
            "CPU threads %d -> %d (%.1f of %d CPUs free of other processes)",
            torch.get_num_threads(),
            target,
            free,
            len(self.cpus),
        )
        torch.set_num_threads(target)
        return target


CPU_THREADS_HELP = (
    "torch's CPU threads: auto (one per CPU that other processes leave free, re-measured every "
    "few seconds; the default on CPU unless OMP_NUM_THREADS is set), torch (torch's own choice, "
    "fixed) or a number"
)


def parse_cpu_threads(value: str) -> str | int:
    """The ``--cpu_threads`` value: ``"auto"``, ``"torch"`` or a positive count."""
    if value in ("auto", "torch"):
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    # argparse prints this message as it is (a ValueError would become "invalid value")
    raise argparse.ArgumentTypeError(f"{value!r}: auto, torch or a positive number")


def cpu_threads_for_run(setting: str | int, device: torch.device) -> FreeCpuThreads | None:
    """Apply ``--cpu_threads`` for training on ``device``; returns the controller to
    :meth:`~FreeCpuThreads.update` every step, or ``None`` when the count stays fixed.

    ``auto`` follows the free CPUs only on a CPU device and when the user has not fixed the count
    with ``OMP_NUM_THREADS``. A number above the CPUs this process may run on is lowered to them
    with a warning: more threads than CPUs only wait for each other.
    """
    if isinstance(setting, int):
        cpus = len(allowed_cpus())
        if setting > cpus:
            logger.warning(
                "--cpu_threads %d: this process may run on %d CPUs; using %d threads", setting, cpus, cpus
            )
            setting = cpus
        torch.set_num_threads(setting)
        return None
    if setting == "torch" or device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    controller = FreeCpuThreads()
    return controller if controller.available else None
