"""How many CPU threads the sampler uses, chosen by measuring.

A sampling call is a few hundred small operations. A second thread makes them faster when
the other core is free (the vocabulary projection and the matrix products split well), but
when another process keeps that core busy every parallel region waits for a descheduled
thread, and a call gets many times slower (benchmarks/README.md, "Threads").
Neither is known in advance and either can change during a long run, so
:class:`ThreadTuner` starts with one thread, watches how busy the machine is apart from
this process (``/proc/stat``), moves to all threads once it has seen the other cores free
for the first 0.1 s, and from then on, while they stay free, now and then runs a few calls
with the other setting and keeps whichever was faster. The first call after a
change of thread count is not compared: the thread pool wakes up during it and it can take
much longer, which made early probes lose; but a probe call (that one included)
more than 3x slower than usual ends the probe at once. More threads are only tried right
after a look at the other cores found them free: a call slowed down by a busy machine never
sends the sampler to more threads, whose calls would then be slower still. A lost
probe makes the next one wait twice as long, or longer (probing costs at most MAX_SHARE of
the time); when other processes take the cores, it goes back to one thread. The engine
(:mod:`bd3.sampling.engine`) owns one; on a GPU the DiT runs and nothing is tuned.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections import deque

import torch

PROBE_CALLS = 3  # timed calls per probe
PROBE_WARMUP = 1  # untimed calls first (the thread pool wakes up)
WIN = 0.9  # a probe must be this much faster (median per call) to switch
FIRST = 0.1  # seconds of sampling before the first look at the other cores
MAX_SHARE = 0.01  # a lost probe's cost may be at most this share of the time until the next
MAX_WAIT = 30.0  # seconds between probes at most
JUMP = 3.0  # a call this much slower than usual (the other core got busy) probes at once
LOST = 3.0  # a probe call this much slower than usual ends the probe, lost


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine, or None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


class Load:
    """Cores other processes kept busy since the last :meth:`others` call."""

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self.last = (_cpu_jiffies(), time.process_time())

    def others(self) -> float | None:
        now = (_cpu_jiffies(), time.process_time())
        (j0, p0), (j1, p1) = self.last, now
        if j0 is None or j1 is None or j1[1] <= j0[1]:
            return None
        self.last = now
        busy = (j1[0] - j0[0]) / (j1[1] - j0[1]) * self.cores  # cores busy, this process included
        wall = (j1[1] - j0[1]) / self.cores / os.sysconf("SC_CLK_TCK")
        return max(busy - (p1 - p0) / wall, 0.0) if wall > 0 else None


class ThreadTuner:
    """``with tuner.call(): ...`` around every model call picks and measures its threads.

    ``threads``: a fixed count (no tuning), or None to tune between 1 and torch's setting.
    """

    def __init__(self, threads: int | None = None, device: torch.device | str = "cpu") -> None:
        self.max = torch.get_num_threads()
        cpu = torch.device(device).type == "cpu"
        self.fixed = threads if threads is not None else (None if cpu and self.max > 1 else self.max)
        self.active = self.fixed or 1
        self.times: dict[int, deque] = {1: deque(maxlen=8), self.max: deque(maxlen=8)}
        self.probing: list[float] | None = None
        self.warmup = 0  # probe calls still to skip
        self.cost = 0.0  # seconds spent in the current probe, its warm-up included
        self.next_probe = time.perf_counter() + FIRST  # a probe may start after this
        self.wait = 2.0  # seconds until the next probe after a lost one (doubles)
        self.switches = 0
        self.load = Load() if self.fixed is None else None
        self.next_check = time.perf_counter() + FIRST
        self.checked = False  # the first look at the other cores is still to come
        self.free = False  # the last look found the other cores free

    @property
    def other(self) -> int:
        return self.max if self.active == 1 else 1

    def _busy(self) -> bool:
        """Whether other processes use the cores that more threads would need."""
        others = self.load.others()
        return others is not None and others + self.max > self.load.cores + 0.25

    def _threads(self) -> int:
        if self.fixed is not None:
            return self.fixed
        now = time.perf_counter()
        if self.probing is None and now >= self.next_check:
            self.next_check = now + 0.5
            first, self.checked = not self.checked, True
            self.free = not self._busy()
            if not self.free:
                if self.active != 1:  # the other core got busy: back to one thread
                    self.active, self.switches = 1, self.switches + 1
                self.next_probe = max(self.next_probe, now + 0.5)
                return self.active
            if first and self.active == 1:  # the other cores are free: use them, measure one thread later
                self.active, self.switches = self.max, self.switches + 1
                self.next_probe = now + self.wait
        probe_ok = self.active != 1 or self.free  # more threads only while the other cores are free
        if self.probing is None and now >= self.next_probe and probe_ok and len(self.times[self.active]) >= PROBE_CALLS:
            self.probing, self.warmup, self.cost = [], PROBE_WARMUP, 0.0
        return self.other if self.probing is not None else self.active

    @contextlib.contextmanager
    def call(self):
        n = self._threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        t = time.perf_counter()
        yield
        if self.fixed is None:
            self._record(n, time.perf_counter() - t)

    def _record(self, n: int, seconds: float) -> None:
        if self.probing is None:
            recent = self.times[n]
            if len(recent) >= PROBE_CALLS and seconds > JUMP * statistics.median(recent):
                self.next_probe = 0.0
            recent.append(seconds)
            return
        current = statistics.median(self.times[self.active])
        self.cost += seconds
        if self.warmup:
            self.warmup -= 1
            if seconds < LOST * current:
                return
        else:
            self.probing.append(seconds)
            if len(self.probing) < PROBE_CALLS and seconds < LOST * current:
                return
        if len(self.probing) == PROBE_CALLS and statistics.median(self.probing) < WIN * current:
            self.times[self.other].clear()
            self.times[self.other].extend(self.probing)
            self.active = self.other
            self.switches += 1
            self.wait = 2.0
        else:
            self.wait = min(max(2 * self.wait, self.cost / MAX_SHARE), MAX_WAIT)
        self.probing = None
        self.next_probe = time.perf_counter() + self.wait


@contextlib.contextmanager
def restore_threads():
    """Put torch's thread count back afterwards (the tuner changes it)."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
