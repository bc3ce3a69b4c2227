"""Export of logged trajectories to JSONL and Parquet, decoded exec results included."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dsec.errors import InvalidSpec
from dsec.trajectory.export import export_jsonl, export_parquet, log_steps
from dsec.trajectory.filelog import FileLog
from dsec.trajectory.log import StepRef
from dsec.v1 import sandbox_pb2 as pb

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def log(tmp_path: Path):
    with FileLog(tmp_path / "log") as opened:
        for step in range(3):
            record = pb.ExecRecord(stdout=b"out %d\n" % step, stderr=b"", status=pb.ExecStatus(exit_code=step))
            assert opened.begin(StepRef("run/p/0", step, f"h{step}", "exec", "sb-1"))
            opened.complete(StepRef("run/p/0", step, f"h{step}", "exec", "sb-1"), record.SerializeToString(), 1.0, 2.0)
        opened.fork("run/p/0", 2, "run/p/1")
        yield opened


def test_jsonl(log: FileLog, tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    assert export_jsonl(log_steps(log), ["run/p/0", "run/p/1"], path) == 5
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["trajectory_id"], r["step"], r["exit_code"], r["stdout"]) for r in lines[:3]] == [
        ("run/p/0", 0, 0, "out 0\n"), ("run/p/0", 1, 1, "out 1\n"), ("run/p/0", 2, 2, "out 2\n"),
    ]
    assert lines[3]["trajectory_id"] == "run/p/1" and lines[3]["stored_in"] == "run/p/0"
    assert pb.ExecRecord.FromString(base64.b64decode(lines[0]["result"])).stdout == b"out 0\n"


def test_parquet(log: FileLog, tmp_path: Path) -> None:
    path = tmp_path / "out.parquet"
    assert export_parquet(log_steps(log), ["run/p/0"], path) == 3
    table = pq.read_table(path)
    assert table.column("step").to_pylist() == [0, 1, 2]
    assert table.column("stdout").to_pylist() == [b"out 0\n", b"out 1\n", b"out 2\n"]


def test_unknown_trajectory(log: FileLog, tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec, match="never logged"):
        export_jsonl(log_steps(log), ["nope"], tmp_path / "x.jsonl")
