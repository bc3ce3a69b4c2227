"""Behaviour both backends (file log, PostgreSQL) must share: durability, forks, retention, checksums."""

from __future__ import annotations

import time

import psycopg
import pytest

from dsec.errors import InvalidSpec, RuntimeFailure
from dsec.trajectory.log import StepRef
from dsec.trajectory.log import TrajectoryLog
from dsec.trajectory.pglog import PostgresLog
from dsec.trajectory.records import StepState

pytestmark = pytest.mark.timeout(120)


def _log_step(log: TrajectoryLog, tid: str, step: int, result: bytes, rhash: str = "h") -> None:
    assert log.begin(StepRef(tid, step, rhash, "exec", "sb-1"))
    log.complete(StepRef(tid, step, rhash, "exec", "sb-1"), result, 1.0, 2.0)


def test_steps_survive_reopen(log: TrajectoryLog, reopen) -> None:
    blob = bytes(range(256)) * 40
    for step in range(4):
        _log_step(log, "run/a", step, blob + bytes([step]))
    assert log.begin(StepRef("run/a", 4, "h", "exec", "sb-1"))  # in flight when the server stopped
    log.attach("run/a", "sb-2")
    log.record_snapshot("run/a", 3, "snap-3")
    with reopen(log) as again:
        steps = again.steps("run/a")
        assert [s.result for s in steps[:4]] == [blob + bytes([i]) for i in range(4)]
        assert steps[4].state is StepState.INTENT and steps[4].result is None
        info = again.info("run/a")
        assert info.sandbox_id == "sb-2" and info.snapshots == [(3, "snap-3")] and info.own_steps == 5
        assert not again.begin(StepRef("run/a", 2, "h", "exec", "sb-1"))  # a logged step is never claimed twice


def test_fork_and_retention(log: TrajectoryLog) -> None:
    for step in range(3):
        _log_step(log, "p/0", step, b"p%d" % step)
    _log_step(log, "stale", 0, b"s")
    time.sleep(0.05)
    cutoff = time.time()
    log.fork("p/0", 2, "p/0/s1")
    _log_step(log, "p/0/s1", 2, b"own", rhash="x")
    assert [(s.step, s.result, s.stored_in) for s in log.steps("p/0/s1")] == [
        (0, b"p0", "p/0"), (1, b"p1", "p/0"), (2, b"own", "p/0/s1"),
    ]
    assert log.lookup("p/0/s1", 2).result == b"own" and log.lookup("p/0", 2).result == b"p2"
    assert [t.trajectory_id for t in log.list("p/")] == ["p/0", "p/0/s1"]
    with pytest.raises(InvalidSpec, match="share its prefix"):
        log.delete("p/0")
    assert log.gc(max_age_s=1.0, now=cutoff + 1.0) == ["stale"]  # p/0 is idle too, but its fork is not
    log.delete("p/0/s1")
    assert [t.trajectory_id for t in log.list()] == ["p/0"]


def test_postgres_detects_a_corrupted_result(fresh_pg_dsn: str) -> None:
    with PostgresLog(fresh_pg_dsn) as log:
        _log_step(log, "t", 0, b"the real result")
        with psycopg.connect(fresh_pg_dsn, autocommit=True) as conn:
            conn.execute("UPDATE dsec_steps SET result = 'tampered'::bytea")
        with pytest.raises(RuntimeFailure, match="checksum"):
            log.lookup("t", 0)


def test_postgres_counts_commits(fresh_pg_dsn: str) -> None:
    with PostgresLog(fresh_pg_dsn) as log:
        for step in range(10):
            _log_step(log, "t", step, b"r")
        stats = log.stats()
        assert stats.appends == 20 and stats.fsyncs == 20
