"""Export logged trajectories straight from a log (offline, or inside the server) with the JSONL/Parquet writers
of dsec/step_export.py, which the SDK's export from a live server uses too."""

from __future__ import annotations

from dsec.errors import InvalidSpec
from dsec.step_export import StepsOf, export_jsonl, export_parquet
from dsec.trajectory.log import StepRecord, TrajectoryLog

__all__ = ["export_jsonl", "export_parquet", "log_steps"]


def log_steps(log: TrajectoryLog) -> StepsOf:
    """Read steps straight from a log (offline, or inside the server)."""

    def steps_of(trajectory_id: str) -> list[StepRecord]:
        if log.info(trajectory_id) is None:
            raise InvalidSpec(f"cannot export trajectory {trajectory_id!r}: it was never logged (or was deleted)")
        return log.steps(trajectory_id, with_results=True)

    return steps_of
