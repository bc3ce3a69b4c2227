"""Logged trajectory steps as training data: JSONL (one step per line) or Parquet (one row per step).

Why both: JSONL is what people grep and stream into scripts; Parquet is what data loaders read column-wise
at scale. Results are the server's serialized messages; for the common kinds (exec, session, call, file
write, upload) the exporter decodes them into readable fields, and keeps the raw bytes for everything else.
Why here, at the bottom layer: the same writers serve the SDK's export from a live server (dsec.sdk.trajectory,
steps as LoggedSteps) and the offline export straight from a log (dsec/trajectory/export.py, StepRecords).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dsec.v1 import sandbox_pb2 as pb

_COLUMNS = (
    "trajectory_id", "step", "kind", "state", "request_hash", "sandbox_id", "stored_in", "started_at",
    "finished_at", "exit_code", "stdout", "stderr", "result",
)  # fmt: skip


def _decoded(kind: str, result: bytes | None) -> dict[str, Any]:
    """Readable fields of a result; unknown kinds keep only the raw bytes."""
    if result is None:
        return {}
    try:
        if kind in ("exec", "session"):
            record = pb.ExecRecord.FromString(result)
            return {"exit_code": record.status.exit_code, "stdout": record.stdout, "stderr": record.stderr}
        if kind == "call":
            reply = pb.CallResponse.FromString(result)
            return {"exit_code": 1 if reply.is_error else 0, "stdout": reply.stdout, "stderr": reply.stderr}
    except Exception:  # noqa: BLE001 - an undecodable result is still exported, raw
        return {}
    return {}


StepsOf = Callable[[str], Sequence[Any]]


def rows(steps_of: StepsOf, trajectory_ids: Iterable[str]) -> Iterator[dict[str, Any]]:
    """One dict per logged step, fork prefixes included, in trajectory then step order.

    `steps_of` gives a trajectory's steps as StepRecords (dsec.trajectory.export.log_steps) or as LoggedSteps
    (the SDK's `Trajectory.steps`), so the same export runs offline and against a live server.
    """
    for trajectory_id in trajectory_ids:
        for record in steps_of(trajectory_id):
            yield _row(trajectory_id, record)


def _row(trajectory_id: str, record: Any) -> dict[str, Any]:
    state = record.state
    row: dict[str, Any] = {
        "trajectory_id": trajectory_id,
        "step": record.step,
        "kind": record.kind,
        "state": getattr(state, "value", state),
        "request_hash": record.request_hash,
        "sandbox_id": record.sandbox_id,
        "stored_in": record.stored_in,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "exit_code": None,
        "stdout": None,
        "stderr": None,
        "result": record.result if record.result is not None and state == "done" else None,  # a StepState equals its string
    }
    row.update(_decoded(record.kind, row["result"]))
    return row


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace")


def export_jsonl(steps_of: StepsOf, trajectory_ids: Iterable[str], path: Path) -> int:
    """Write one JSON object per step; stdout/stderr as text, the raw result base64. Returns rows written."""
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for row in rows(steps_of, trajectory_ids):
            row["stdout"], row["stderr"] = _text(row["stdout"]), _text(row["stderr"])
            row["result"] = None if row["result"] is None else base64.b64encode(row["result"]).decode()
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def export_parquet(steps_of: StepsOf, trajectory_ids: Iterable[str], path: Path) -> int:
    """Write a Parquet table (one row per step, binary stdout/stderr/result). Returns rows written."""
    # function-level: pyarrow is the optional `db` extra, needed for Parquet only (JSONL needs nothing)
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("trajectory_id", pa.string()), ("step", pa.int64()), ("kind", pa.string()), ("state", pa.string()),
            ("request_hash", pa.string()), ("sandbox_id", pa.string()), ("stored_in", pa.string()),
            ("started_at", pa.float64()), ("finished_at", pa.float64()), ("exit_code", pa.int32()),
            ("stdout", pa.binary()), ("stderr", pa.binary()), ("result", pa.binary()),
        ]
    )  # fmt: skip
    table_rows = list(rows(steps_of, trajectory_ids))
    columns = {name: [row[name] for row in table_rows] for name in _COLUMNS}
    pq.write_table(pa.table(columns, schema=schema), path)
    return len(table_rows)
