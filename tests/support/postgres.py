"""A throwaway PostgreSQL server: Debian's binaries run as user postgres on a free loopback port.

Tests that need a real database (the PostgreSQL trajectory log, the log a cluster's nodes share) start one of
their own, so a run never depends on a server someone left running, and nothing survives the run.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support.ports import free_port

PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"))


def _as_postgres(*argv: str, timeout: float = 120) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, text=True,
                   timeout=timeout)


@contextmanager
def throwaway_postgres(prefix: str, max_connections: int = 100) -> Iterator[str]:
    """Yield the DSN of a fresh server; it is stopped and its data deleted on exit, also on failure."""
    assert PG_BIN, "PostgreSQL is not installed: run infra/setup.sh (Debian package postgresql)"
    bindir = PG_BIN[-1]
    root = Path(tempfile.mkdtemp(prefix=prefix))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    shutil.chown(root, "postgres")
    shutil.chown(sockets, "postgres")
    port = free_port()
    _as_postgres(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    try:
        _as_postgres(
            str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(root / "log"), "start", "-o",
            f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections={max_connections}",
        )  # fmt: skip
        yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    finally:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True, timeout=60,
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
