"""The embedded trajectory log: append-only segment files on local disk, group-committed, indexed in memory.

Layout under the log directory: ``segment-00000001.log`` … (append-only frames, see records.py) and
``log.lock`` (flock held by the one process that owns the log). On open every segment is scanned to
rebuild the index; a torn or garbage tail of the last segment — what a crash during a write leaves — is
truncated, while a bad record followed by good ones is real corruption and stops the open, because
truncating there would drop acknowledged records. Results are read back from disk by offset and
checked against their checksum, so the index holds locations, not result bytes.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsec.errors import InvalidSpec, RuntimeFailure
from dsec.trajectory.groupcommit import GroupCommitWriter
from dsec.trajectory.log import LogStats, StepRecord, StepRef, TrajectoryInfo, TrajectoryLog, check_trajectory_id
from dsec.trajectory.records import MAGIC, CorruptRecord, Record, RecordType, StepState, decode_frame

log = logging.getLogger("dsec.trajectory")

SEGMENT_RE = re.compile(r"^segment-(\d{8})\.log$")
DEFAULT_SEGMENT_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class Loc:
    segment: int
    offset: int
    size: int


@dataclass(slots=True)
class _Step:
    request_hash: str
    kind: str
    sandbox_id: str
    state: StepState
    started_at: float
    intent: Loc
    finished_at: float = 0.0
    result: Loc | None = None
    abandon: Loc | None = None
    error: str = ""


@dataclass(slots=True)
class _Trajectory:
    info: TrajectoryInfo
    steps: dict[int, _Step] = field(default_factory=dict)
    meta: list[Loc] = field(default_factory=list)  # FORK / ATTACH / SNAPSHOT frames, copied by compaction


class LogInUse(RuntimeFailure):
    """Another process holds this log directory (its flock)."""


def _segment_name(number: int) -> str:
    return f"segment-{number:08d}.log"


class FileLog(TrajectoryLog):
    """One process's durable log in `directory` (created if missing)."""

    def __init__(self, directory: Path, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._segment_bytes = segment_bytes
        self._lock = threading.RLock()
        self._lock_fd = os.open(self.directory / "log.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise LogInUse(
                f"trajectory log {self.directory} is in use by another dsec server; "
                "give each server its own DSEC_HOME or use the PostgreSQL backend (DSEC_TRAJECTORY_DSN)"
            ) from None
        self._read_fds: dict[int, int] = {}
        self._trajectories: dict[str, _Trajectory] = {}
        self._claimed: set[tuple[str, int]] = set()
        self._torn = 0
        self._closed_stats = LogStats()
        self._load()
        self._open_writer()

    # ---------- opening ----------
    def _segments(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := SEGMENT_RE.match(p.name)))

    def _load(self) -> None:
        for stale in self.directory.glob("*.compacting"):
            stale.unlink()
        segments = self._segments()
        superseded = [n for n in segments if n < max((n for n in segments if self._is_compacted(n)), default=0)]
        for number in superseded:
            (self.directory / _segment_name(number)).unlink()
        segments = [n for n in segments if n not in superseded]
        self._trajectories = {}
        for index, number in enumerate(segments):
            self._scan(number, last=index == len(segments) - 1)
        self._segment = segments[-1] if segments else 1

    def _is_compacted(self, number: int) -> bool:
        with open(self.directory / _segment_name(number), "rb") as f:
            head = f.read(4096)
        try:
            return decode_frame(head, 0).record.type is RecordType.COMPACTED
        except CorruptRecord:
            return False

    def _scan(self, number: int, last: bool) -> None:
        path = self.directory / _segment_name(number)
        size = path.stat().st_size
        if size == 0:
            return
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            offset = 0
            while offset < size:
                try:
                    decoded = decode_frame(buf, offset)
                except CorruptRecord as exc:
                    self._bad_record(path, buf, offset, size, last, str(exc))
                    return
                self._apply(decoded.record, Loc(number, offset, decoded.size))
                offset += decoded.size

    def _bad_record(self, path: Path, buf: mmap.mmap, offset: int, size: int, last: bool, why: str) -> None:
        later = buf.find(MAGIC, offset + 1)
        while later != -1:
            try:
                decode_frame(buf, later)
            except CorruptRecord:
                later = buf.find(MAGIC, later + 1)
                continue
            raise RuntimeFailure(
                f"trajectory log {path} is corrupt at byte {offset} ({why}) with intact records after it; "
                "this is not a torn write: restore the file from a backup or move it aside to start fresh"
            )
        if not last:
            raise RuntimeFailure(
                f"trajectory log {path} ends in a bad record at byte {offset} ({why}) but is not the newest segment; "
                "restore it from a backup or move it aside"
            )
        log.warning("trajectory log %s: truncating torn tail at byte %d (%d bytes, %s)", path, offset, size - offset, why)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._torn += size - offset

    def _open_writer(self) -> None:
        path = self.directory / _segment_name(self._segment)
        self._write_fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the segment's directory entry must survive a crash too
        finally:
            os.close(dir_fd)
        self._writer = GroupCommitWriter(self._write_fd, os.fstat(self._write_fd).st_size, path.name)

    def _close_writer(self) -> None:
        self._writer.close()
        self._closed_stats.appends += self._writer.appends
        self._closed_stats.fsyncs += self._writer.fsyncs
        os.close(self._write_fd)

    # ---------- the index ----------
    def _trajectory(self, trajectory_id: str, at: float) -> _Trajectory:
        entry = self._trajectories.get(trajectory_id)
        if entry is None:
            entry = _Trajectory(TrajectoryInfo(trajectory_id, created_at=at, updated_at=at))
            self._trajectories[trajectory_id] = entry
        return entry

    def _apply(self, record: Record, loc: Loc) -> None:
        """Apply one durable record to the index. Idempotent, so a compaction interrupted halfway is harmless."""
        kind = record.type
        if kind is RecordType.COMPACTED:
            return
        if kind is RecordType.DELETE:
            self._trajectories.pop(record.trajectory_id, None)
            return
        at = record.finished_at or record.started_at
        entry = self._trajectory(record.trajectory_id, at)
        entry.info.updated_at = max(entry.info.updated_at, at)
        step = entry.steps.get(record.step)
        if kind is RecordType.INTENT:
            if step is None or step.state is StepState.ABANDONED:
                entry.steps[record.step] = _Step(
                    record.request_hash, record.kind, record.sandbox_id, StepState.INTENT, record.started_at, loc
                )
                entry.info.own_steps = len(entry.steps)
        elif kind is RecordType.RESULT:
            if step is not None and step.state is StepState.INTENT:
                step.state, step.result, step.finished_at = StepState.DONE, loc, record.finished_at
            if record.sandbox_id:
                entry.info.sandbox_id = record.sandbox_id
        elif kind is RecordType.ABANDON:
            if step is not None and step.state is StepState.INTENT:
                step.state, step.abandon, step.error = StepState.ABANDONED, loc, record.error
        elif kind is RecordType.FORK:
            if not entry.info.parent_id:
                entry.info.parent_id, entry.info.fork_step = record.parent_id, record.step
                entry.meta.append(loc)
        elif kind is RecordType.ATTACH:
            entry.info.sandbox_id = record.sandbox_id
            entry.meta.append(loc)
        elif kind is RecordType.SNAPSHOT:
            if (record.step, record.snapshot_ref) not in entry.info.snapshots:
                entry.info.snapshots.append((record.step, record.snapshot_ref))
                entry.meta.append(loc)

    def _append(self, record: Record) -> None:
        """Write one record durably, then apply it to the index."""
        frame = record.encode()
        with self._lock:
            if self._writer.position >= self._segment_bytes:
                self._rotate()
            segment = self._segment
            ticket, offset = self._writer.submit(frame)
            writer = self._writer
        writer.wait(ticket)
        with self._lock:
            self._apply(record, Loc(segment, offset, len(frame)))

    def _rotate(self) -> None:
        self._close_writer()
        self._segment += 1
        self._open_writer()

    def _read(self, loc: Loc) -> Record:
        fd = self._read_fds.get(loc.segment)
        if fd is None:
            fd = os.open(self.directory / _segment_name(loc.segment), os.O_RDONLY)
            self._read_fds[loc.segment] = fd
        frame = os.pread(fd, loc.size, loc.offset)
        try:
            return decode_frame(frame, 0).record
        except CorruptRecord as exc:
            raise RuntimeFailure(
                f"trajectory log {self.directory}: record at {_segment_name(loc.segment)}:{loc.offset} "
                f"fails its checksum on read ({exc}); the disk corrupted it after it was written"
            ) from exc

    # ---------- writes ----------
    def begin(self, ref: StepRef, request: bytes = b"") -> bool:
        key = (ref.trajectory_id, ref.step)
        with self._lock:
            entry = self._trajectories.get(ref.trajectory_id)
            existing = entry.steps.get(ref.step) if entry else None
            if key in self._claimed or (existing is not None and existing.state is not StepState.ABANDONED):
                return False
            self._claimed.add(key)
        try:
            self._append(
                Record(RecordType.INTENT, ref.trajectory_id, ref.step, ref.request_hash, ref.kind, ref.sandbox_id,
                       time.time(), request=request)
            )
        finally:
            with self._lock:
                self._claimed.discard(key)
        return True

    def complete(self, ref: StepRef, result: bytes, started_at: float, finished_at: float) -> None:
        self._append(
            Record(
                RecordType.RESULT, ref.trajectory_id, ref.step, ref.request_hash, ref.kind, ref.sandbox_id, started_at,
                finished_at, result=result,
            )
        )

    def abandon(self, trajectory_id: str, step: int, error: str) -> None:
        self._append(Record(RecordType.ABANDON, trajectory_id, step, finished_at=time.time(), error=error))

    def _create_fork(self, parent: TrajectoryInfo, at_step: int, new_id: str) -> None:
        self._append(
            Record(RecordType.FORK, new_id, at_step, parent_id=parent.trajectory_id, started_at=time.time(),
                   sandbox_id=parent.sandbox_id)
        )
        if parent.sandbox_id:
            self.attach(new_id, parent.sandbox_id)

    def attach(self, trajectory_id: str, sandbox_id: str) -> None:
        check_trajectory_id(trajectory_id)
        self._append(Record(RecordType.ATTACH, trajectory_id, sandbox_id=sandbox_id, started_at=time.time()))

    def record_snapshot(self, trajectory_id: str, step: int, snapshot_ref: str) -> None:
        check_trajectory_id(trajectory_id)
        if not snapshot_ref:
            raise InvalidSpec(f"trajectory {trajectory_id!r}: empty snapshot reference")
        self._append(
            Record(RecordType.SNAPSHOT, trajectory_id, step, snapshot_ref=snapshot_ref, started_at=time.time())
        )

    def _delete(self, trajectory_ids: list[str]) -> None:
        for trajectory_id in trajectory_ids:
            self._append(Record(RecordType.DELETE, trajectory_id, started_at=time.time()))
        self.compact()

    def compact(self) -> None:
        """Rewrite the live records into one new segment and drop the old ones (reclaims deleted trajectories).

        Crash-safe: the new segment is complete and fsynced before it is renamed into place, and its first
        record (COMPACTED) tells the next open to ignore every older segment.
        """
        with self._lock:
            self._close_writer()
            old = self._segments()
            number = self._segment + 1
            tmp = self.directory / (_segment_name(number) + ".compacting")
            with open(tmp, "wb") as out:
                out.write(Record(RecordType.COMPACTED, "", started_at=time.time()).encode())
                for entry in self._trajectories.values():
                    locs = list(entry.meta)
                    for _, step in sorted(entry.steps.items()):
                        locs.append(step.intent)
                        if step.state is StepState.ABANDONED and step.abandon:
                            locs.append(step.abandon)
                        if step.state is StepState.DONE and step.result:
                            locs.append(step.result)
                    for loc in locs:
                        out.write(self._read(loc).encode())
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.directory / _segment_name(number))
            self._segment = number
            for fd in self._read_fds.values():
                os.close(fd)
            self._read_fds = {}
            for segment in old:
                (self.directory / _segment_name(segment)).unlink()
            self._load()
            self._open_writer()

    # ---------- reads ----------
    def _record(self, trajectory_id: str, number: int, step: _Step, with_result: bool, with_request: bool) -> StepRecord:
        result = request = None
        if with_request:
            request = self._read(step.intent).request
        if with_result and step.result is not None:
            result = self._read(step.result).result
        return StepRecord(
            trajectory_id, number, step.request_hash, step.kind, step.sandbox_id, step.state, step.started_at,
            step.finished_at, result, request or b"", step.error,
        )

    def _own_step(self, trajectory_id: str, step: int, with_result: bool) -> StepRecord | None:
        with self._lock:
            entry = self._trajectories.get(trajectory_id)
            found = entry.steps.get(step) if entry else None
            return self._record(trajectory_id, step, found, with_result, False) if found else None

    def _own_steps(self, trajectory_id: str, with_results: bool) -> list[StepRecord]:
        with self._lock:
            entry = self._trajectories.get(trajectory_id)
            if entry is None:
                return []
            return [self._record(trajectory_id, n, s, with_results, with_results) for n, s in sorted(entry.steps.items())]

    def info(self, trajectory_id: str) -> TrajectoryInfo | None:
        with self._lock:
            entry = self._trajectories.get(trajectory_id)
            if entry is None:
                return None
            info = entry.info
            return TrajectoryInfo(
                info.trajectory_id, info.parent_id, info.fork_step, info.sandbox_id, info.created_at,
                info.updated_at, len(entry.steps), list(info.snapshots),
            )

    def list(self, prefix: str = "") -> list[TrajectoryInfo]:
        with self._lock:
            ids = sorted(t for t in self._trajectories if t.startswith(prefix))
        return [info for t in ids if (info := self.info(t)) is not None]

    def stats(self) -> LogStats:
        with self._lock:
            if self._lock_fd < 0:
                return LogStats(self._closed_stats.appends, self._closed_stats.fsyncs, self._torn)
            return LogStats(
                self._closed_stats.appends + self._writer.appends,
                self._closed_stats.fsyncs + self._writer.fsyncs,
                self._torn,
            )

    def close(self) -> None:
        with self._lock:
            if self._lock_fd < 0:
                return
            self._close_writer()
            for fd in self._read_fds.values():
                os.close(fd)
            self._read_fds = {}
            os.close(self._lock_fd)
            self._lock_fd = -1
