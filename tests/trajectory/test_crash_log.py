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


@pytest.mark.timeout(120)
def test_a_doubled_effect_is_counted(tmp_path: Path) -> None:
    """The count comes from the effects: a step whose effect is (deliberately) written twice is one double execution."""
    report = run_crash_suite(tmp_path, kills=0, trajectories=2, steps=6, double_effect=3)
    assert report.double_executions == 1
    assert report.executions == 2 * 6 + 1
    assert any("step 3 is logged done but ran 2 times" in p for p in report.problems), report.problems


@pytest.mark.timeout(120)
def test_a_rerun_in_a_fork_is_counted(tmp_path: Path) -> None:
    """Killed right after step 2's effect, before its result is logged; continuing in a fork runs step 2 again,
    and that second run is a double execution of the rollout's step 2, not a first run of the fork's."""
    report = run_crash_suite(tmp_path, kills=0, trajectories=1, steps=5, recovery="fork", crash_after_effect=2)
    assert report.indeterminate == 1 and report.restarts == 2
    assert report.double_executions == 1
    assert report.lost_records == 0
    assert any("~ step 2 is logged done but ran 2 times" in p for p in report.problems), report.problems


@pytest.mark.timeout(120)
def test_an_indeterminate_step_with_its_effect_is_resolved_without_running_again(tmp_path: Path) -> None:
    report = run_crash_suite(tmp_path, kills=0, trajectories=1, steps=5, crash_after_effect=2)
    assert report.indeterminate == 1 and report.restarts == 2
    assert report.double_executions == 0 and report.executions == 5
    assert report.problems == [] and report.lost_records == 0
    assert report.acked == 5 and report.resolved_from_effect == 1
