"""kill -9 the server during creates, execs and destroys; the next server leaves the host clean."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .probe import host_snapshot, sandbox_ids_of_server, traces
from .rounds import run_rounds

ROUNDS = 12


@pytest.mark.timeout(400)
def test_kill9_rounds_leave_nothing_behind():
    home = Path(os.environ["DSEC_HOME"])
    report = run_rounds(ROUNDS, home, driver="crun", seed=1234)
    print(
        f"recovery: {report.rounds} rounds, {report.creates} creates, {report.execs} execs, {report.destroys} destroys, "
        f"{report.sandboxes_at_kill} sandboxes alive or in flight at the kills"
    )
    assert report.rounds == ROUNDS
    assert report.creates > 0 and report.sandboxes_at_kill > 0, "the kills never hit a sandbox: the rounds tested nothing"
    assert report.errors == []
    assert report.start_failures == []
    assert report.leaks == []


def test_probe_sees_a_dead_run_dir(tmp_path):
    """The audit itself must notice what a successor failed to reap."""
    (tmp_path / "run" / "deadbeef").mkdir(parents=True)
    (tmp_path / "run" / "deadbeef" / "server.lock").write_text("1")
    assert any("dead run dir" in item for item in host_snapshot(tmp_path))


def test_traces_of_a_killed_server_are_found_before_reaping(tmp_path):
    """The audit sees a killed server's sandbox (its state dir) until a successor reaps it."""
    run_dir = tmp_path / "run" / "abc"
    (run_dir / "sb-0123456789abcdef").mkdir(parents=True)
    (run_dir / "server.lock").write_text("424242")
    found_dir, ids = sandbox_ids_of_server(tmp_path, 424242)
    assert found_dir == run_dir and ids == ["sb-0123456789abcdef"]
    assert traces(tmp_path, ids) == [f"state dir {run_dir / 'sb-0123456789abcdef'}"]
