"""Wait until the machine's CPUs are quiet, so a timed sample does not carry the previous one's background work.

Why: a call that returns is not always done. After `docker exec` returns, containerd, its shim and dockerd go on
working (reaping, events) for a few milliseconds; after a dsec destroy returns, the server unmounts on a thread.
In a fixed round-robin order that work lands in the next contender's sample: `perf sched` on 2 cores showed
~2.5 ms of Docker's CPU inside each 3.7 ms dsec exec that followed a `docker exec`. Waiting for quiet before
every sample, whoever comes next, charges each side only with its own call.

Quiet means: the machine-wide CPU time (the root cgroup's: v2 `cpu.stat`, v1 `cpuacct.usage`) grew by less than
5 % of a 2 ms window, and at its end nothing but this process is runnable (`/proc/loadavg`): CPU time is
accounted when a task sleeps or at a scheduler tick, so a task that never sleeps shows only in the run queue.
Where no CPU clock is readable the wait is a fixed pause, the same for every contender.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

QUIET_WINDOW_S = 0.002  # how long the CPUs must stay (almost) idle
QUIET_BUSY_FRACTION = 0.05  # CPU time in that window, all CPUs together, over its wall time
QUIET_CAP_S = 0.2  # a machine busy with other work never goes quiet: stop waiting (that load hits all alike)
FALLBACK_PAUSE_S = 0.02

_V2 = Path("/sys/fs/cgroup/cpu.stat")
_V1 = Path("/sys/fs/cgroup/cpuacct/cpuacct.usage")
_LOADAVG = Path("/proc/loadavg")


def _v2_busy_ns() -> int:
    for line in _V2.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) * 1000
    raise OSError("no usage_usec in cpu.stat")


def _v1_busy_ns() -> int:
    return int(_V1.read_text())


def _busy_clock() -> Callable[[], int] | None:
    """A function returning the machine's CPU time used so far in ns, or None where none is readable."""
    for clock in (_v2_busy_ns, _v1_busy_ns):
        try:
            clock()
        except (OSError, ValueError):
            continue
        return clock
    return None


_CLOCK = _busy_clock()


def _others_runnable() -> bool:
    """Whether a task besides the caller is running or waiting for a CPU right now."""
    try:
        running = int(_LOADAVG.read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return False
    return running > 1


def wait_quiet(window_s: float = QUIET_WINDOW_S, busy_fraction: float = QUIET_BUSY_FRACTION,
               cap_s: float = QUIET_CAP_S) -> float:
    """Return once a `window_s` passed with the CPUs busy under `busy_fraction` of it (or after `cap_s`);
    the seconds waited."""
    started = time.monotonic()
    if _CLOCK is None:
        time.sleep(FALLBACK_PAUSE_S)
        return time.monotonic() - started
    while time.monotonic() - started < cap_s:
        busy_before, wall_before = _CLOCK(), time.monotonic()
        time.sleep(window_s)
        busy, wall = _CLOCK() - busy_before, time.monotonic() - wall_before
        if busy < busy_fraction * wall * 1e9 and not _others_runnable():
            break
    return time.monotonic() - started
