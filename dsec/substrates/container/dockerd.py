"""Find a working Docker Engine, or start one by hand.

Why by hand: this host has no systemd, and the Debian engine's defaults (iptables rules, a docker0 bridge)
either fail here or touch host networking. So dsec runs its own `dockerd` on a private socket with its data
under `$DSEC_HOME/docker`, no iptables and no bridge. The engine is host infrastructure like PostgreSQL:
`infra/setup.d/35-docker.sh` starts it, the Docker driver starts it on demand when setup did not, and every
later caller reuses the running one (its containers are what dsec cleans up, not the engine).

Root in a container is not root on the host (issue #22): the engine runs with `--userns-remap=dsec-docker`, so
every container's ids 0..65535 are host ids 200000000..200065535 (`/etc/subuid` and `/etc/subgid`, written here
idempotently). The range sits below the crun/runc slots (268435456.., `userns.py`) and above `/etc/subuid`'s
usual 100000+ login ranges, so it overlaps neither. Docker's remap is daemon-wide: all Docker-driver sandboxes
share this one range (weaker than crun/runc's range per sandbox, docs/hardening.md). An engine found running
without the remap (started by an older dsec) is stopped and started again with it.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import signal
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel, Field

from dsec.config import default_home
from dsec.errors import RuntimeFailure
from dsec.substrates.container.userns import make_reachable

DSEC_DOCKER_SOCKET = Path("/run/dsec-docker.sock")
REMAP_USER = "dsec-docker"
REMAP_BASE = 200_000_000  # below userns.HOST_BASE (268435456), above the usual 100000+ subordinate ranges
REMAP_IDS = 65536
STOP_TIMEOUT_S = 60.0


class EngineConfig(BaseModel):
    """Where the dsec-owned engine listens and keeps its state."""

    socket: Path = DSEC_DOCKER_SOCKET
    data_root: Path
    exec_root: Path = Path("/run/dsec-docker")
    pidfile: Path = Path("/run/dsec-docker.pid")
    log_file: Path
    start_timeout_s: float = Field(60.0, gt=0)
    userns_remap: bool = True  # False only for a benchmark's or a test's peer engine at Docker's defaults

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


def _get_json(base_url: str, path: str, timeout_s: float) -> dict:
    conn = _UnixHTTPConnection(base_url[len("unix://") :], timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeFailure(f"dockerd at {base_url} answered {path} with HTTP {response.status}")
        return json.loads(body)
    finally:
        conn.close()


def remap_base(info: dict) -> int | None:
    """The host uid of a container's root on an engine with `/info` `info`, or None when the engine does not remap.

    Why from the data root: Docker names a remapping engine's storage `<data-root>/<uid>.<gid>` after the first
    id of its range, and /info says nothing else about the range."""
    if not any("name=userns" in opt for opt in info.get("SecurityOptions") or []):
        return None
    uid, _, _gid = Path(info.get("DockerRootDir", "")).name.partition(".")
    if not uid.isdigit():
        raise RuntimeFailure(f"the engine remaps user ids but its root dir {info.get('DockerRootDir')!r} names no range")
    return int(uid)


def ensure_remap_ids() -> None:
    """Create the `dsec-docker` system user and its subordinate range (dockerd's `--userns-remap` needs both).

    Idempotent: a user or a line already there is kept. dockerd takes the first range listed for the user, so
    one is written only when the user has none."""
    if subprocess.run(["getent", "passwd", REMAP_USER], capture_output=True).returncode != 0:
        proc = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", REMAP_USER],
            capture_output=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if proc.returncode not in (0, 9):  # 9: created meanwhile by a concurrent caller
            raise RuntimeFailure(f"useradd {REMAP_USER} failed: {proc.stderr.decode(errors='replace').strip()}")
    for path in (Path("/etc/subuid"), Path("/etc/subgid")):
        text = path.read_text() if path.exists() else ""
        if not any(line.split(":")[0] == REMAP_USER for line in text.splitlines()):
            with open(path, "a") as f:
                f.write(("" if not text or text.endswith("\n") else "\n") + f"{REMAP_USER}:{REMAP_BASE}:{REMAP_IDS}\n")


def _remaps(base_url: str) -> bool:
    return remap_base(_get_json(base_url, "/info", 10.0)) is not None


def _alive(pid: int) -> bool:
    """Whether `pid` still runs; reaps it when it is this process's own child (ensure_engine started it here)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    if state != "Z":
        return True
    try:  # exited: reap it if it is our own child (a zombie's wait returns at once; checking the state first
        os.waitpid(pid, 0)  # means a child that exits between a WNOHANG wait and the state read is still reaped)
    except ChildProcessError:
        pass
    return False


def stop_engine(cfg: EngineConfig) -> None:
    """SIGTERM the engine of `cfg.pidfile` and wait for it to exit (it stops its containers first). For an engine
    dsec started: ensure_engine restarting one without the remap, a test's or benchmark's own second engine."""
    try:
        pid = int(cfg.pidfile.read_text().strip())
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"the engine on {cfg.socket} runs without userns-remap and {cfg.pidfile} names no pid") from exc
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    raise RuntimeFailure(f"dockerd (pid {pid}) did not stop within {STOP_TIMEOUT_S:.0f}s of SIGTERM")


def _start_dockerd(cfg: EngineConfig) -> None:
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise RuntimeFailure("dockerd is not installed: run infra/setup.sh (it installs docker.io)")
    cfg.data_root.mkdir(parents=True, exist_ok=True)
    cfg.exec_root.mkdir(parents=True, exist_ok=True)
    if cfg.userns_remap:
        ensure_remap_ids()
        make_reachable(cfg.data_root)  # dockerd refuses a data root the mapped root cannot walk to
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
        *(["--userns-remap", REMAP_USER] if cfg.userns_remap else []),
    ]  # fmt: skip
    with open(cfg.log_file, "ab") as log:
        # A daemon on purpose: its own session so it survives the process that happened to start it.
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)


def ensure_engine(home: Path | None = None, *, use_docker_host: bool = True, cfg: EngineConfig | None = None) -> str:
    """Return the base URL of a live engine: `$DOCKER_HOST` if it answers, else dsec's own, started if needed.

    Idempotent and safe to call from many processes at once: a file lock serialises the start, and a
    running engine is reused when its remap setting is the one `cfg` asks for (else it is restarted with it,
    which stops its containers: it happens once, when an older dsec's engine is found). `cfg` defaults to the
    engine of `home` (the shared one); tests and benchmarks pass their own to run a second engine.
    """
    env_host = os.environ.get("DOCKER_HOST", "")
    if use_docker_host and cfg is None and env_host and ping(env_host):
        return env_host
    cfg = cfg or EngineConfig.for_home(home or default_home())
    if ping(cfg.base_url) and _remaps(cfg.base_url) == cfg.userns_remap:
        return cfg.base_url
    cfg.data_root.mkdir(parents=True, exist_ok=True)
    with open(cfg.data_root.parent / ".dsec-dockerd.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ping(cfg.base_url):
            if _remaps(cfg.base_url) == cfg.userns_remap:
                return cfg.base_url
            stop_engine(cfg)
        _start_dockerd(cfg)
        deadline = time.monotonic() + cfg.start_timeout_s
        while time.monotonic() < deadline:
            if ping(cfg.base_url, timeout_s=1.0):
                return cfg.base_url
            time.sleep(0.1)
    raise RuntimeFailure(
        f"dockerd did not answer on {cfg.socket} within {cfg.start_timeout_s:.0f}s; see {cfg.log_file}"
    )
