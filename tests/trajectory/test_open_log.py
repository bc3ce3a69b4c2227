"""open_log: the server's choice of backend, and a second server on the same home not failing to start."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsec.config import ServerConfig
from dsec.trajectory.coordinator import open_log
from dsec.trajectory.filelog import FileLog
from dsec.trajectory.log import StepRef
from dsec.trajectory.pglog import PostgresLog

pytestmark = pytest.mark.timeout(120)


def test_file_log_by_default_and_next_directory_when_held(tmp_path: Path) -> None:
    config = ServerConfig(home=tmp_path, trajectory_dsn="")
    with open_log(config) as first, open_log(config) as second:
        assert isinstance(first, FileLog) and first.directory == config.trajectory_dir
        assert isinstance(second, FileLog) and second.directory == tmp_path / "trajectories-1"
    with open_log(config) as again:  # a restarted lone server gets the primary log back
        assert again.directory == config.trajectory_dir


def test_postgres_when_a_dsn_is_configured(tmp_path: Path, fresh_pg_dsn: str) -> None:
    with open_log(ServerConfig(home=tmp_path, trajectory_dsn=fresh_pg_dsn)) as log:
        assert isinstance(log, PostgresLog)
        assert log.begin(StepRef("t", 0, "h", "exec", "sb"))
