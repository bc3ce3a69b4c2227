"""A real `dsec serve` child process with both listeners (gRPC and the HTTP front door), for the compat tests.

`dsec_http` is shared by the whole session; `start_dsec_http(extra_args)` starts a private one (e.g. with a
tokens file). The server's trajectory log and run state are private; the image store is the machine's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dsec.sdk.embedded import EmbeddedServer

SHARED_HOME = Path(os.environ.get("DSEC_HOME", "/var/lib/dsec"))
PRIVATE = {"run", "logs", "trajectories"}  # per-server state; everything else (images, engines) is shared


def private_home(root: Path) -> Path:
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    for entry in SHARED_HOME.iterdir() if SHARED_HOME.exists() else ():
        if entry.name.split("-")[0] not in PRIVATE and not (home / entry.name).exists():
            (home / entry.name).symlink_to(entry)
    return home


@dataclass
class DsecHttp:
    """A running server: `.grpc_address` for dsec's SDK, `.http_url` for HTTP clients, `.env` for the e2b SDK."""

    server: EmbeddedServer
    home: Path
    api_key: str = "e2b_dsec_test_key"
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.env = {"E2B_API_URL": self.http_url, "E2B_SANDBOX_URL": self.http_url, "E2B_API_KEY": self.api_key}

    @property
    def grpc_address(self) -> str:
        return self.server.address

    @property
    def http_url(self) -> str:
        assert self.server.http_url, "the server was started without --http-listen"
        return self.server.http_url

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    def stop(self) -> None:
        self.server.stop()


def start_dsec_http(root: Path, extra_args: list[str] | None = None, api_key: str = "e2b_dsec_test_key") -> DsecHttp:
    server = EmbeddedServer.start(home=private_home(root), extra_args=extra_args, http_listen="127.0.0.1:0")
    return DsecHttp(server, root / "home", api_key)


@pytest.fixture(scope="session")
def dsec_http() -> Iterator[DsecHttp]:
    root = Path(tempfile.mkdtemp(prefix="dc-", dir="/tmp"))  # short: sandboxes' unix sockets live under it
    running = start_dsec_http(root)
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def e2b_env(dsec_http: DsecHttp, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point the real e2b SDK at dsec for one test (the SDK reads these variables on each call)."""
    for key, value in dsec_http.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    return dsec_http.env
