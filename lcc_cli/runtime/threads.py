"""How many math threads to use on a machine that is never idle.

torch's default is one thread per core, and its threads meet at a barrier after every
operation: when another program holds one of two cores, every operation waits for the
thread that shares that core, and a compile ran 2.4x slower instead of the ~2x the lost
core explains (two torch jobs side by side: 3.5-13x). So:

- the OpenMP wait policy is PASSIVE (set before torch loads, in cli/app.py): a waiting
  thread sleeps instead of spinning on a core someone else needs;
- `AutoThreads` measures, every few seconds, how many cores *other* processes keep busy
  (from /proc/stat minus this process's own time) and uses the rest, at least one.

`--threads N` pins the count instead. Measured in bench/results (contention table).
"""

from __future__ import annotations

import os
import time

from ..config import cpu_count
from ..progress import Progress


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies summed over all CPUs, or None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _own_jiffies() -> int:
    t = os.times()
    return int((t.user + t.system) * os.sysconf("SC_CLK_TCK"))


class AutoThreads(Progress):
    """A progress pass-through that re-sizes torch's thread pool to the cores others leave
    free, at most every `every` seconds (sampling costs two small file reads)."""

    def __init__(self, inner: Progress, every: float = 5.0):
        self.inner, self.every = inner, every
        self.cores = cpu_count()
        self.last = (time.monotonic(), _busy_jiffies(), _own_jiffies())
        self.threads = self.cores

    def _check(self) -> None:
        now = time.monotonic()
        if now - self.last[0] < self.every:
            return
        busy, own = _busy_jiffies(), _own_jiffies()
        if busy is None or self.last[1] is None:
            return
        d_busy, d_total = busy[0] - self.last[1][0], busy[1] - self.last[1][1]
        d_own = own - self.last[2]
        self.last = (now, busy, own)
        if d_total <= 0:
            return
        others = max(0.0, (d_busy - d_own) / d_total * (os.cpu_count() or self.cores))
        want = max(1, min(self.cores, round(self.cores - others)))
        if want != self.threads:
            import torch

            torch.set_num_threads(want)
            self.threads = want

    def status(self, text):
        self.inner.status(text)

    def start(self, task, total, label=""):
        self.inner.start(task, total, label)

    def advance(self, task, n=1, **metrics):
        self._check()
        self.inner.advance(task, n, **metrics)

    def note(self, text):
        self.inner.note(text)
