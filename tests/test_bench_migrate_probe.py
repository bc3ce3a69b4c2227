"""bench/sandbox_latency.py's cgroup-migration probe cleans up after a run killed mid-sample: the cgroups named
after a pid that is gone lose their `sleep` and are removed; a live run's are left alone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench.sandbox_latency import MIGRATE_GROUP_PREFIX, _remove_dead_runs_groups

ROOT = Path("/sys/fs/cgroup/pids") if Path("/sys/fs/cgroup/pids/cgroup.procs").exists() else Path("/sys/fs/cgroup")


def _reaped_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    assert not Path(f"/proc/{child.pid}").exists()
    return child.pid


@pytest.fixture
def groups():
    made: list[tuple[Path, subprocess.Popen]] = []

    def make(pid: int) -> tuple[Path, subprocess.Popen]:
        group = ROOT / f"{MIGRATE_GROUP_PREFIX}{pid}-0"
        group.mkdir()
        sleeper = subprocess.Popen(["sleep", "600"])
        (group / "cgroup.procs").write_text(str(sleeper.pid))
        made.append((group, sleeper))
        return group, sleeper

    yield make
    for group, sleeper in made:
        sleeper.kill()
        sleeper.wait()
        if group.exists():
            for _ in range(100):
                try:
                    group.rmdir()
                    break
                except OSError:
                    os.sched_yield()


def test_a_killed_runs_probe_cgroups_are_removed_a_live_runs_kept(groups):
    dead_group, dead_sleeper = groups(_reaped_pid())
    live_group, live_sleeper = groups(os.getpid())
    _remove_dead_runs_groups(ROOT)
    assert dead_sleeper.wait(timeout=30) == -9, "the dead run's sleep was killed"
    assert not dead_group.exists()
    assert live_group.exists() and live_sleeper.poll() is None
