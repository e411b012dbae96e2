"""Torch threads that follow the CPUs other processes leave free (``--cpu_threads auto``)."""

from __future__ import annotations

import argparse
import logging
import os

import pytest
import torch

from reslora_diffusers.training.cpu_threads import (
    FreeCpuThreads,
    allowed_cpus,
    busy_seconds,
    cpu_threads_for_run,
    parse_cpu_threads,
)


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_busy_seconds_sums_the_busy_columns_of_the_allowed_cpus(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text(
        "cpu  300 30 60 900 9 3 3 3 0 0\n"
        "cpu0 100 10 20 500 5 1 1 1 0 0\n"
        "cpu1 200 20 40 400 4 2 2 2 0 0\n"
        "intr 12345\n"
    )
    tick = os.sysconf("SC_CLK_TCK")
    assert busy_seconds({0}, stat) == pytest.approx((100 + 10 + 20 + 1 + 1 + 1) / tick)
    assert busy_seconds({0, 1}, stat) == pytest.approx((133 + 266) / tick)
    assert busy_seconds({5}, stat) is None
    assert busy_seconds({0}, tmp_path / "missing") is None


class FakeMachine:
    """Readings of a 2-CPU machine: per window of ``dt`` seconds, this process uses ``own`` CPUs
    and the others ``others`` CPUs (the busy time of the machine is their sum)."""

    def __init__(self) -> None:
        self.t = self.busy = self.own = 0.0

    def window(self, own: float, others: float, dt: float = 2.5) -> None:
        self.t += dt
        self.own += own * dt
        self.busy += (own + others) * dt

    def controller(self) -> FreeCpuThreads:
        return FreeCpuThreads(
            interval=2.0,
            cpus={0, 1},
            system_busy=lambda: self.busy,
            own_cpu=lambda: self.own,
            clock=lambda: self.t,
        )


def test_threads_drop_to_the_free_cpus_after_two_windows_and_come_back(two_threads):
    machine = FakeMachine()
    threads = machine.controller()
    assert threads.available and threads.max_threads == 2

    machine.t += 1.0  # less than a window since the last reading: no reading at all
    assert threads.update() is None

    machine.window(own=1.95, others=0.05)  # idle machine: nothing changes
    assert threads.update() is None and torch.get_num_threads() == 2

    # one CPU-bound process appears: two spinning threads get 1.33 CPUs, it gets 0.67
    machine.window(own=1.33, others=0.67)
    assert threads.free_cpus((machine.t, machine.busy, machine.own)) == pytest.approx(2 - 0.67)
    assert threads.update() is None and torch.get_num_threads() == 2  # the first window only asks
    machine.window(own=1.33, others=0.67)
    assert threads.update() == 1 and torch.get_num_threads() == 1

    machine.window(own=1.0, others=1.0)  # one thread beside it: still one CPU free
    assert threads.update() is None and torch.get_num_threads() == 1

    machine.window(own=1.0, others=0.0)  # it stops
    assert threads.update() is None
    machine.window(own=1.0, others=0.0)
    assert threads.update() == 2 and torch.get_num_threads() == 2


def test_a_single_busy_window_changes_nothing(two_threads):
    machine = FakeMachine()
    threads = machine.controller()
    machine.window(own=1.0, others=1.0)
    assert threads.update() is None
    machine.window(own=2.0, others=0.0)  # the burst is over: the pending change is dropped
    assert threads.update() is None
    machine.window(own=1.0, others=1.0)
    assert threads.update() is None and torch.get_num_threads() == 2


def test_never_more_threads_than_torch_chose(two_threads):
    machine = FakeMachine()
    torch.set_num_threads(1)  # e.g. physical cores only, where hyperthreads double the CPUs
    threads = machine.controller()
    for _ in range(3):
        machine.window(own=0.0, others=0.0)
        assert threads.update() is None
    assert torch.get_num_threads() == 1


def test_without_proc_stat_the_controller_does_nothing(two_threads):
    threads = FreeCpuThreads(system_busy=lambda: None)
    assert not threads.available and threads.update() is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux only")
def test_the_real_counters_advance():
    threads = FreeCpuThreads(interval=0.0)
    assert threads.available
    before = busy_seconds(threads.cpus)
    sum(i * i for i in range(2_000_000))  # some CPU time of our own
    assert busy_seconds(threads.cpus) >= before


def test_the_cpu_threads_flag(two_threads, monkeypatch):
    assert parse_cpu_threads("auto") == "auto" and parse_cpu_threads("3") == 3
    for bad in ("0", "-1", "many"):
        with pytest.raises(argparse.ArgumentTypeError, match="auto, torch or a positive number"):
            parse_cpu_threads(bad)
    cpu = torch.device("cpu")
    assert cpu_threads_for_run(1, cpu) is None and torch.get_num_threads() == 1
    assert cpu_threads_for_run("torch", cpu) is None
    assert cpu_threads_for_run("auto", torch.device("cuda")) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user fixed the count
    assert cpu_threads_for_run("auto", cpu) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    expected = FreeCpuThreads if os.path.exists("/proc/stat") else type(None)
    assert isinstance(cpu_threads_for_run("auto", cpu), expected)


def test_a_thread_count_above_the_cpus_is_lowered_to_them(two_threads, caplog):
    cpus = len(allowed_cpus())
    with caplog.at_level(logging.WARNING):
        assert cpu_threads_for_run(999, torch.device("cpu")) is None
    assert torch.get_num_threads() == cpus
    assert f"--cpu_threads 999: this process may run on {cpus} CPUs; using {cpus} threads" in caplog.text
