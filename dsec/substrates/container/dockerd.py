"""Find a working Docker Engine, or start one by hand.

Why by hand: this host has no systemd, and the Debian engine's defaults (iptables rules, a docker0 bridge)
either fail here or touch host networking. So dsec runs its own `dockerd` on a private socket with its data
under `$DSEC_HOME/docker`, no iptables and no bridge. The engine is host infrastructure like PostgreSQL:
`infra/setup.d/35-docker.sh` starts it, the Docker driver starts it on demand when setup did not, and every
later caller reuses the running one (its containers are what dsec cleans up, not the engine).
"""

from __future__ import annotations

import fcntl
import http.client
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel, Field

from dsec.config import default_home
from dsec.errors import RuntimeFailure

DSEC_DOCKER_SOCKET = Path("/run/dsec-docker.sock")


class EngineConfig(BaseModel):
    """Where the dsec-owned engine listens and keeps its state."""

    socket: Path = DSEC_DOCKER_SOCKET
    data_root: Path
    exec_root: Path = Path("/run/dsec-docker")
    pidfile: Path = Path("/run/dsec-docker.pid")
    log_file: Path
    start_timeout_s: float = Field(60.0, gt=0)

    @classmethod
    def for_home(cls, home: Path) -> EngineConfig:
        return cls(data_root=home / "docker", log_file=home / "docker" / "dockerd.log")

    @property
    def base_url(self) -> str:
        return f"unix://{self.socket}"


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def ping(base_url: str, timeout_s: float = 2.0) -> bool:
    """True if an engine answers `/_ping` at `base_url` (unix:// or tcp://). Never raises, never hangs."""
    try:
        if base_url.startswith("unix://"):
            conn: http.client.HTTPConnection = _UnixHTTPConnection(base_url[len("unix://") :], timeout_s)
        elif base_url.startswith(("tcp://", "http://")):
            conn = http.client.HTTPConnection(base_url.split("://", 1)[1], timeout=timeout_s)
        else:
            return False
        try:
            conn.request("GET", "/_ping")
            response = conn.getresponse()
            return response.status == 200 and response.read() == b"OK"
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return False


def _start_dockerd(cfg: EngineConfig) -> None:
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise RuntimeFailure("dockerd is not installed: run infra/setup.sh (it installs docker.io)")
    cfg.data_root.mkdir(parents=True, exist_ok=True)
    cfg.exec_root.mkdir(parents=True, exist_ok=True)
    argv = [
        dockerd,
        "--host", cfg.base_url,
        "--data-root", str(cfg.data_root),
        "--exec-root", str(cfg.exec_root),
        "--pidfile", str(cfg.pidfile),
        "--storage-driver", "overlay2",
        "--iptables=false",
        "--ip-masq=false",
        "--bridge=none",
        "--log-level", "warn",
    ]  # fmt: skip
    with open(cfg.log_file, "ab") as log:
        # A daemon on purpose: its own session so it survives the process that happened to start it.
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)


def ensure_engine(home: Path | None = None, *, use_docker_host: bool = True) -> str:
    """Return the base URL of a live engine: `$DOCKER_HOST` if it answers, else dsec's own, started if needed.

    Idempotent and safe to call from many processes at once: a file lock serialises the start, and a
    running engine is always reused.
    """
    env_host = os.environ.get("DOCKER_HOST", "")
    if use_docker_host and env_host and ping(env_host):
        return env_host
    cfg = EngineConfig.for_home(home or default_home())
    if ping(cfg.base_url):
        return cfg.base_url
    cfg.data_root.mkdir(parents=True, exist_ok=True)
    with open(cfg.data_root.parent / ".dsec-dockerd.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ping(cfg.base_url):
            return cfg.base_url
        _start_dockerd(cfg)
        deadline = time.monotonic() + cfg.start_timeout_s
        while time.monotonic() < deadline:
            if ping(cfg.base_url, timeout_s=1.0):
                return cfg.base_url
            time.sleep(0.1)
    raise RuntimeFailure(
        f"dockerd did not answer on {cfg.socket} within {cfg.start_timeout_s:.0f}s; see {cfg.log_file}"
    )
