"""Cluster fixtures: node servers behind a gateway (no Ray), and a throwaway PostgreSQL for shared logs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsec.sdk.embedded import EmbeddedServer

PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"))


def home() -> Path:
    return Path(os.environ["DSEC_HOME"])


def reap_dead_servers() -> None:
    """Start and stop one server on the home: at start it cleans what killed node servers left."""
    EmbeddedServer.start(home()).stop()


@pytest.fixture
def node_servers() -> Iterator[list[EmbeddedServer]]:
    """Two node servers (the nodes of a gateway); killed ones are reaped at teardown."""
    servers = [EmbeddedServer.start(home()) for _ in range(2)]
    yield servers
    killed = False
    for server in servers:
        killed |= server.process.poll() is not None
        server.stop()
    if killed:
        reap_dead_servers()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_postgres(*argv: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def shared_log_dsn() -> Iterator[str]:
    """A PostgreSQL of our own on loopback: the trajectory log every node shares."""
    assert PG_BIN, "PostgreSQL is not installed: run infra/setup.sh (Debian package postgresql)"
    bindir = PG_BIN[-1]
    root = Path(tempfile.mkdtemp(prefix="dsec-cluster-pg-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    shutil.chown(root, "postgres")
    shutil.chown(sockets, "postgres")
    port = _free_port()
    _as_postgres(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    try:
        _as_postgres(
            str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(root / "log"), "start", "-o",
            f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c max_connections=100",
        )  # fmt: skip
        yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    finally:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)
