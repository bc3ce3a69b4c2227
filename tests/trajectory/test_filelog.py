"""The embedded file log: durability across reopen, torn-tail truncation, corruption detection, group commit,
fork sharing, retention and compaction."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from dsec.errors import InvalidSpec, RuntimeFailure
from dsec.trajectory.filelog import FileLog
from dsec.trajectory.log import StepRef
from dsec.trajectory.records import Record, RecordType, StepState

pytestmark = pytest.mark.timeout(120)


def _log_step(log: FileLog, tid: str, step: int, result: bytes, rhash: str = "h") -> None:
    assert log.begin(StepRef(tid, step, rhash, "exec", "sb-1"))
    log.complete(StepRef(tid, step, rhash, "exec", "sb-1"), result, 1.0, 2.0)


def _segment(directory: Path) -> Path:
    (segment,) = sorted(directory.glob("segment-*.log"))
    return segment


def test_records_survive_reopen(tmp_path: Path) -> None:
    with FileLog(tmp_path) as log:
        for step in range(5):
            _log_step(log, "run/a", step, f"out-{step}".encode())
        log.attach("run/a", "sb-9")
        log.record_snapshot("run/a", 4, "snap-1")
    with FileLog(tmp_path) as log:
        steps = log.steps("run/a")
        assert [s.result for s in steps] == [f"out-{i}".encode() for i in range(5)]
        assert all(s.state is StepState.DONE for s in steps)
        info = log.info("run/a")
        assert info is not None and info.sandbox_id == "sb-9" and info.snapshots == [(4, "snap-1")]
        assert log.stats().torn_bytes_truncated == 0


def test_second_process_cannot_open_the_same_log(tmp_path: Path) -> None:
    with FileLog(tmp_path):
        with pytest.raises(RuntimeFailure, match="in use"):
            FileLog(tmp_path)


@pytest.mark.parametrize("tail", [b"\x00" * 7, b"garbage that is not a frame", "partial"])
def test_torn_tail_is_truncated(tmp_path: Path, tail: bytes | str) -> None:
    with FileLog(tmp_path) as log:
        for step in range(3):
            _log_step(log, "t", step, b"x" * 100)
    segment = _segment(tmp_path)
    good_size = segment.stat().st_size
    if tail == "partial":
        frame = Record(RecordType.RESULT, "t", 3, "h", result=b"y" * 100).encode()
        tail = frame[: len(frame) // 2]
    with open(segment, "ab") as f:
        f.write(tail)
    with FileLog(tmp_path) as log:
        assert log.stats().torn_bytes_truncated == len(tail)
        assert [s.step for s in log.steps("t")] == [0, 1, 2]
        _log_step(log, "t", 3, b"after")  # appends land right after the last good record
    assert segment.stat().st_size > good_size
    with FileLog(tmp_path) as log:
        assert log.steps("t")[3].result == b"after"


def test_corruption_followed_by_good_records_refuses_to_open(tmp_path: Path) -> None:
    with FileLog(tmp_path) as log:
        for step in range(3):
            _log_step(log, "t", step, b"payload-%d" % step)
    segment = _segment(tmp_path)
    data = bytearray(segment.read_bytes())
    data[data.find(b"payload-0")] ^= 0xFF  # flip one byte in an early, acknowledged record
    segment.write_bytes(bytes(data))
    with pytest.raises(RuntimeFailure, match="corrupt"):
        FileLog(tmp_path)


def test_group_commit_batches_fsyncs(tmp_path: Path) -> None:
    with FileLog(tmp_path) as log:
        def writer(i: int) -> None:
            for step in range(100):
                _log_step(log, f"t{i}", step, b"r")

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = log.stats()
        assert stats.appends == 16 * 100 * 2
        assert stats.fsyncs < stats.appends / 2, stats
    with FileLog(tmp_path) as log:
        assert sum(len(log.steps(f"t{i}")) for i in range(16)) == 1600


def test_fork_shares_the_prefix(tmp_path: Path) -> None:
    with FileLog(tmp_path) as log:
        for step in range(4):
            _log_step(log, "prompt/0", step, b"p%d" % step)
        log.fork("prompt/0", 2, "prompt/0/fork")
        _log_step(log, "prompt/0/fork", 2, b"f2", rhash="other")
        forked = log.steps("prompt/0/fork")
        assert [(s.step, s.result) for s in forked] == [(0, b"p0"), (1, b"p1"), (2, b"f2")]
        assert forked[0].stored_in == "prompt/0"
        assert log.lookup("prompt/0/fork", 1).result == b"p1"
        assert log.lookup("prompt/0/fork", 3) is None
        with pytest.raises(InvalidSpec, match="not logged"):
            log.fork("prompt/0", 9, "prompt/0/too-far")
        with pytest.raises(InvalidSpec, match="already exists"):
            log.fork("prompt/0", 1, "prompt/0/fork")
        with pytest.raises(InvalidSpec, match="share its prefix"):
            log.delete("prompt/0")


def test_gc_drops_idle_trajectories_and_compacts(tmp_path: Path) -> None:
    with FileLog(tmp_path) as log:
        for tid in ("old/a", "old/b"):
            _log_step(log, tid, 0, b"z" * 4096)
        time.sleep(0.05)
        cutoff = time.time()
        log.fork("old/b", 1, "new/fork-of-old-b")
        _log_step(log, "new/a", 0, b"n")
        size_before = sum(p.stat().st_size for p in tmp_path.glob("segment-*.log"))
        dropped = log.gc(max_age_s=1.0, now=cutoff + 1.0)  # idle means: last record before `cutoff`
        assert dropped == ["old/a"]  # old/b is kept: a fork that is still used shares its prefix
        assert {t.trajectory_id for t in log.list()} == {"old/b", "new/a", "new/fork-of-old-b"}
        assert sum(p.stat().st_size for p in tmp_path.glob("segment-*.log")) < size_before
    with FileLog(tmp_path) as log:
        assert {t.trajectory_id for t in log.list()} == {"old/b", "new/a", "new/fork-of-old-b"}
        assert log.steps("new/fork-of-old-b")[0].result == b"z" * 4096


def test_rotation_keeps_every_record(tmp_path: Path) -> None:
    with FileLog(tmp_path, segment_bytes=4096) as log:
        for step in range(50):
            _log_step(log, "t", step, os.urandom(200))
        assert len(list(tmp_path.glob("segment-*.log"))) > 1
        expected = [s.result for s in log.steps("t")]
    with FileLog(tmp_path, segment_bytes=4096) as log:
        assert [s.result for s in log.steps("t")] == expected


def test_bad_ids_are_rejected(tmp_path: Path) -> None:
    with FileLog(tmp_path) as log:
        with pytest.raises(InvalidSpec):
            log.begin(StepRef("", 0, "h", "exec", "sb"))
        with pytest.raises(InvalidSpec):
            log.begin(StepRef("t", -1, "h", "exec", "sb"))
