"""Fixtures: a throwaway PostgreSQL cluster (the Debian package's binaries, run as user postgres on a loopback
port) and a `log` fixture that runs backend-agnostic tests against both the file log and PostgreSQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.ports import free_port
from support.postgres import throwaway_postgres

from dsec.trajectory.filelog import FileLog
from dsec.trajectory.log import TrajectoryLog
from dsec.trajectory.pglog import PostgresLog


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A PostgreSQL server of our own, stopped and deleted at the end of the session (also on failure)."""
    with throwaway_postgres("dsec-pg-", max_connections=200) as dsn:
        yield dsn


@pytest.fixture
def fresh_pg_dsn(pg_dsn: str) -> Iterator[str]:
    """A database of its own per test, so PostgreSQL tests never see each other's trajectories."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield pg_dsn.replace("dbname=postgres", f"dbname={name}")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["file", "postgres"])
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TrajectoryLog]:
    if request.param == "file":
        opened: TrajectoryLog = FileLog(tmp_path / "log")
    else:
        opened = PostgresLog(request.getfixturevalue("fresh_pg_dsn"))
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def reopen(request: pytest.FixtureRequest, tmp_path: Path):
    """Close `log` and open the same store again (what a server restart does)."""

    def again(current: TrajectoryLog) -> TrajectoryLog:
        current.close()
        if isinstance(current, FileLog):
            return FileLog(current.directory)
        assert isinstance(current, PostgresLog)
        return PostgresLog(current.dsn)

    return again



# ---------- a real dsec server of our own (standalone process), for end-to-end and crash tests ----------

SHARED_HOME = Path(os.environ.get("DSEC_HOME", "/var/lib/dsec"))
PRIVATE = {"run", "logs", "trajectories"}  # per-server state; everything else (images, engines) is shared
DRIVER = os.environ.get("DSEC_TRAJECTORY_TEST_DRIVER", "")  # "" = the server's default container driver


def private_home(root: Path) -> Path:
    """A home whose trajectory log and run state are ours, sharing the machine's image store and engines."""
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    for entry in SHARED_HOME.iterdir() if SHARED_HOME.exists() else ():
        if entry.name.split("-")[0] not in PRIVATE and not (home / entry.name).exists():
            (home / entry.name).symlink_to(entry)
    return home


class ServerProcess:
    """`python -m dsec.server.main` on a loopback port; killed with its test (the server also watches us)."""

    def __init__(self, home: Path, metrics_port: int, extra_args: list[str] | None = None) -> None:
        self.home = home
        self.metrics_port = metrics_port
        self.extra_args = extra_args or []
        self.process: subprocess.Popen | None = None
        self.address = ""

    def start(self) -> ServerProcess:
        from dsec.sdk.embedded import EmbeddedServer

        started = EmbeddedServer.start(
            home=self.home, extra_args=["--metrics-listen", f"127.0.0.1:{self.metrics_port}", *self.extra_args]
        )
        self.process, self.address = started.process, started.address
        self._embedded = started
        return self

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(60)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self._embedded.stop()

    def executed(self, kind: str = "exec") -> float:
        """Server-side executions of logged steps since this process started (Prometheus counter)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as reply:
            text = reply.read().decode()
        wanted = f'dsec_trajectory_steps_total{{kind="{kind}",outcome="executed"}}'
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(wanted))


@pytest.fixture
def server_args() -> list[str]:
    """Extra `dsec serve` arguments for `dsec_server` (override in a test module)."""
    return []


@pytest.fixture
def dsec_server(server_args: list[str]) -> Iterator[ServerProcess]:
    root = Path(tempfile.mkdtemp(prefix="dt-", dir="/tmp"))  # short: sandboxes' unix sockets live under it
    try:
        server = ServerProcess(private_home(root), free_port(), server_args).start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
