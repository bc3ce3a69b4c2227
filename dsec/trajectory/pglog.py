"""The cluster trajectory log: PostgreSQL, so several dsec servers share one exactly-once record.

Why PostgreSQL suffices for exactly-once across servers: the intent is an INSERT on the (trajectory, step)
primary key, so of two servers racing for a step exactly one wins the row; the loser sees `begin` return
False. Every write is its own transaction, durable at COMMIT (synchronous_commit), and PostgreSQL batches
concurrent commits into one WAL flush — the group commit the file log does by hand. Results carry a crc32
that is checked on read, so a corrupted row is reported rather than replayed.
"""

from __future__ import annotations

import threading
import time
import zlib
from typing import Any

import psycopg

from dsec.errors import InvalidSpec, RuntimeFailure, ServerUnavailable
from dsec.trajectory.log import LogStats, StepRecord, StepRef, TrajectoryInfo, TrajectoryLog, check_trajectory_id
from dsec.trajectory.records import StepState

SCHEMA = """
CREATE TABLE IF NOT EXISTS dsec_trajectories (
    trajectory_id text PRIMARY KEY,
    parent_id text NOT NULL DEFAULT '',
    fork_step bigint NOT NULL DEFAULT 0,
    sandbox_id text NOT NULL DEFAULT '',
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS dsec_steps (
    trajectory_id text NOT NULL REFERENCES dsec_trajectories ON DELETE CASCADE,
    step bigint NOT NULL,
    request_hash text NOT NULL,
    kind text NOT NULL,
    sandbox_id text NOT NULL,
    state text NOT NULL,
    started_at double precision NOT NULL,
    finished_at double precision NOT NULL DEFAULT 0,
    request bytea NOT NULL DEFAULT '',
    result bytea,
    result_crc bigint,
    error text NOT NULL DEFAULT '',
    PRIMARY KEY (trajectory_id, step)
);
CREATE TABLE IF NOT EXISTS dsec_snapshots (
    trajectory_id text NOT NULL REFERENCES dsec_trajectories ON DELETE CASCADE,
    step bigint NOT NULL,
    snapshot_ref text NOT NULL,
    created_at double precision NOT NULL,
    PRIMARY KEY (trajectory_id, step, snapshot_ref)
);
"""

_TOUCH = """
INSERT INTO dsec_trajectories (trajectory_id, created_at, updated_at) VALUES (%(t)s, %(now)s, %(now)s)
ON CONFLICT (trajectory_id) DO UPDATE SET updated_at = GREATEST(dsec_trajectories.updated_at, EXCLUDED.updated_at)
"""


class PostgresLog(TrajectoryLog):
    """A trajectory log in the PostgreSQL database at `dsn` (tables are created if missing)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._local = threading.local()
        self._connections: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._commits = 0
        self._appends = 0
        self._closed = False
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(7270101)")  # servers starting together create tables once
            cur.execute(SCHEMA)

    # ---------- plumbing ----------
    def _connection(self) -> psycopg.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            if self._closed:
                raise RuntimeFailure("the PostgreSQL trajectory log is closed")
            try:
                conn = psycopg.connect(self.dsn, connect_timeout=10)
            except psycopg.OperationalError as exc:
                raise ServerUnavailable(
                    f"cannot reach the PostgreSQL trajectory log ({exc}); check DSEC_TRAJECTORY_DSN and the database"
                ) from exc
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _tx(self, writes: int = 0) -> _Transaction:
        return _Transaction(self, writes)

    def _query(self, sql: str, params: dict[str, Any] | tuple = ()) -> list[tuple]:
        with self._tx() as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    # ---------- writes ----------
    def begin(self, ref: StepRef, request: bytes = b"") -> bool:
        now = time.time()
        with self._tx(writes=1) as cur:
            cur.execute(_TOUCH, {"t": ref.trajectory_id, "now": now})
            cur.execute(
                """
                INSERT INTO dsec_steps (trajectory_id, step, request_hash, kind, sandbox_id, state, started_at, request)
                VALUES (%s, %s, %s, %s, %s, 'intent', %s, %s)
                ON CONFLICT (trajectory_id, step) DO UPDATE SET
                    request_hash = EXCLUDED.request_hash, kind = EXCLUDED.kind, sandbox_id = EXCLUDED.sandbox_id,
                    state = 'intent', started_at = EXCLUDED.started_at, finished_at = 0, request = EXCLUDED.request,
                    result = NULL, result_crc = NULL, error = ''
                WHERE dsec_steps.state = 'abandoned'
                RETURNING 1
                """,
                (ref.trajectory_id, ref.step, ref.request_hash, ref.kind, ref.sandbox_id, now, request),
            )
            return cur.fetchone() is not None

    def complete(self, ref: StepRef, result: bytes, started_at: float, finished_at: float) -> None:
        with self._tx(writes=1) as cur:
            cur.execute(
                """
                UPDATE dsec_steps SET state = 'done', result = %s, result_crc = %s, finished_at = %s
                WHERE trajectory_id = %s AND step = %s AND request_hash = %s AND state = 'intent'
                """,
                (result, zlib.crc32(result), finished_at, ref.trajectory_id, ref.step, ref.request_hash),
            )
            cur.execute(
                "UPDATE dsec_trajectories SET sandbox_id = %s, updated_at = GREATEST(updated_at, %s) "
                "WHERE trajectory_id = %s",
                (ref.sandbox_id, finished_at, ref.trajectory_id),
            )

    def abandon(self, trajectory_id: str, step: int, error: str) -> None:
        with self._tx(writes=1) as cur:
            cur.execute(
                "UPDATE dsec_steps SET state = 'abandoned', error = %s, finished_at = %s "
                "WHERE trajectory_id = %s AND step = %s AND state = 'intent'",
                (error, time.time(), trajectory_id, step),
            )

    def _create_fork(self, parent: TrajectoryInfo, at_step: int, new_id: str) -> None:
        now = time.time()
        with self._tx(writes=1) as cur:
            cur.execute(
                "INSERT INTO dsec_trajectories VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
                (new_id, parent.trajectory_id, at_step, parent.sandbox_id, now, now),
            )
            if cur.fetchone() is None:
                raise InvalidSpec(f"cannot fork into {new_id!r}: it already exists; pick a new id")

    def attach(self, trajectory_id: str, sandbox_id: str) -> None:
        check_trajectory_id(trajectory_id)
        now = time.time()
        with self._tx(writes=1) as cur:
            cur.execute(_TOUCH, {"t": trajectory_id, "now": now})
            cur.execute("UPDATE dsec_trajectories SET sandbox_id = %s WHERE trajectory_id = %s", (sandbox_id, trajectory_id))

    def record_snapshot(self, trajectory_id: str, step: int, snapshot_ref: str) -> None:
        check_trajectory_id(trajectory_id)
        if not snapshot_ref:
            raise InvalidSpec(f"trajectory {trajectory_id!r}: empty snapshot reference")
        now = time.time()
        with self._tx(writes=1) as cur:
            cur.execute(_TOUCH, {"t": trajectory_id, "now": now})
            cur.execute(
                "INSERT INTO dsec_snapshots VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (trajectory_id, step, snapshot_ref, now),
            )

    def _delete(self, trajectory_ids: list[str]) -> None:
        with self._tx(writes=1) as cur:
            cur.execute("DELETE FROM dsec_trajectories WHERE trajectory_id = ANY(%s)", (trajectory_ids,))

    # ---------- reads ----------
    def _record(self, row: tuple, with_result: bool) -> StepRecord:
        trajectory_id, step, request_hash, kind, sandbox_id, state, started, finished, request, result, crc, error = row
        if with_result and result is not None:
            result = bytes(result)
            if zlib.crc32(result) != crc:
                raise RuntimeFailure(
                    f"trajectory {trajectory_id!r} step {step}: the logged result fails its checksum; "
                    "the database row was corrupted after it was written"
                )
        return StepRecord(
            trajectory_id, step, request_hash, kind, sandbox_id, StepState(state), started, finished,
            result if with_result else None, bytes(request or b""), error, trajectory_id,
        )

    def _columns(self, with_result: bool) -> str:
        blobs = "request, result, result_crc" if with_result else "''::bytea, NULL::bytea, NULL::bigint"
        return f"trajectory_id, step, request_hash, kind, sandbox_id, state, started_at, finished_at, {blobs}, error"

    def _own_step(self, trajectory_id: str, step: int, with_result: bool) -> StepRecord | None:
        rows = self._query(
            f"SELECT {self._columns(with_result)} FROM dsec_steps WHERE trajectory_id = %s AND step = %s",
            (trajectory_id, step),
        )
        return self._record(rows[0], with_result) if rows else None

    def _own_steps(self, trajectory_id: str, with_results: bool) -> list[StepRecord]:
        rows = self._query(
            f"SELECT {self._columns(with_results)} FROM dsec_steps WHERE trajectory_id = %s ORDER BY step",
            (trajectory_id,),
        )
        return [self._record(row, with_results) for row in rows]

    def _infos(self, where: str, params: tuple) -> list[TrajectoryInfo]:
        rows = self._query(
            f"""
            SELECT t.trajectory_id, t.parent_id, t.fork_step, t.sandbox_id, t.created_at, t.updated_at,
                   (SELECT count(*) FROM dsec_steps s WHERE s.trajectory_id = t.trajectory_id),
                   COALESCE((SELECT array_agg(ARRAY[n.step::text, n.snapshot_ref] ORDER BY n.created_at)
                             FROM dsec_snapshots n WHERE n.trajectory_id = t.trajectory_id), '{{}}')
            FROM dsec_trajectories t WHERE {where} ORDER BY t.trajectory_id
            """,
            params,
        )
        return [
            TrajectoryInfo(tid, parent, fork_step, sandbox, created, updated, own, [(int(s), ref) for s, ref in snaps])
            for tid, parent, fork_step, sandbox, created, updated, own, snaps in rows
        ]

    def info(self, trajectory_id: str) -> TrajectoryInfo | None:
        found = self._infos("t.trajectory_id = %s", (trajectory_id,))
        return found[0] if found else None

    def list(self, prefix: str = "") -> list[TrajectoryInfo]:
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return self._infos("t.trajectory_id LIKE %s", (escaped + "%",))

    def stats(self) -> LogStats:
        with self._lock:
            return LogStats(appends=self._appends, fsyncs=self._commits)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()


class _Transaction:
    """One transaction on the calling thread's connection; a write counts as durable once COMMIT returns."""

    def __init__(self, log: PostgresLog, writes: int) -> None:
        self._log = log
        self._writes = writes

    def __enter__(self) -> psycopg.Cursor:
        self._conn = self._log._connection()
        self._cursor = self._conn.cursor()
        return self._cursor

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        try:
            if exc_type is None:
                self._conn.commit()
                if self._writes:
                    with self._log._lock:
                        self._log._commits += 1
                        self._log._appends += self._writes
                return False
            self._conn.rollback()
        except psycopg.OperationalError as error:
            exc = error
        finally:
            self._cursor.close()
        if isinstance(exc, psycopg.OperationalError):
            self._conn.close()  # the next call on this thread reconnects
            raise ServerUnavailable(
                f"the PostgreSQL trajectory log failed mid-transaction ({exc}); the write was not acknowledged, retry"
            ) from exc
        return False
