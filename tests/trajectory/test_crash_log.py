"""kill -9 of the process that owns the log, at random points: no acknowledged record lost, no step run
twice, torn tails truncated. (bench/trajectory_log.py runs the same suite with 100 kills.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from dsec.trajectory.crashsuite import run_crash_suite


@pytest.mark.timeout(300)
def test_kill_the_log_owner_at_random_points(tmp_path: Path) -> None:
    report = run_crash_suite(tmp_path, kills=8, trajectories=4, steps=50, seed=7)
    assert report.problems == []
    assert report.kills == 8
    assert report.lost_records == 0
    assert report.double_executions == 0
    assert report.acked >= 4 * 50  # at least the last round ran to completion
    assert report.torn_tails_injected >= 1 and report.torn_bytes_truncated > 0
