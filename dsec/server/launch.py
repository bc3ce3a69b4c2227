"""Start `python -m dsec.server.main` as a child process and wait for its ready line; stop it politely.

One place for what the embedded server (SDK without an address) and the Ray node agents both do: the server
prints `DSEC_SERVER_READY <address>` on stdout only after reaping what dead servers left, so a caller that has
the address also has a clean node. stdout keeps being drained afterwards so the child never blocks on a full pipe.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dsec.config import default_home
from dsec.errors import ServerUnavailable

READY_PREFIX = "DSEC_SERVER_READY "
HTTP_READY_PREFIX = "DSEC_HTTP_READY "  # printed just before the ready line when the HTTP front door is on
START_TIMEOUT_S = 120.0


@dataclass
class LaunchedServer:
    process: subprocess.Popen
    address: str
    log_path: Path
    http_address: str | None = None  # host:port of the HTTP front door (`--http-listen`), when started


def launch_server(home: Path | None, args: list[str], log_name: str, new_session: bool = False,
                  timeout_s: float = START_TIMEOUT_S) -> LaunchedServer:
    """Start a server on a free loopback port, bound to this process (`--parent-pid`); stderr goes to
    `home/logs/<log_name>-<pid>-<time>.log` (home None: the server's default, dsec.config.default_home). Raises
    ServerUnavailable, with the log's tail, if it is not ready within `timeout_s`."""
    home = home if home is not None else default_home()
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{log_name}-{os.getpid()}-{time.time_ns()}.log"
    command = [
        sys.executable, "-m", "dsec.server.main",
        "--listen", "127.0.0.1:0",
        "--home", str(home),
        "--parent-pid", str(os.getpid()),
        *args,
    ]  # fmt: skip
    # The HTTP front door is the caller's choice (`--http-listen` in args): an inherited $DSEC_HTTP_LISTEN would make
    # every node server of a cluster on one machine try to bind the same port.
    env = {k: v for k, v in os.environ.items() if k != "DSEC_HTTP_LISTEN"}
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL,
                                   start_new_session=new_session, env=env)
    found: dict[str, str] = {}
    ready = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith(HTTP_READY_PREFIX) and "http" not in found:
                found["http"] = line[len(HTTP_READY_PREFIX) :]
            if line.startswith(READY_PREFIX) and "address" not in found:
                found["address"] = line[len(READY_PREFIX) :]
                ready.set()
        ready.set()  # the child exited (or closed stdout) without a ready line

    threading.Thread(target=read, daemon=True, name="dsec-server-stdout").start()
    ready.wait(timeout_s)
    if "address" not in found:
        process.kill()
        process.wait()
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        raise ServerUnavailable(f"dsec server did not start in {timeout_s:.0f}s; log {log_path}:\n{tail}")
    return LaunchedServer(process, found["address"], log_path, found.get("http"))


def stop_server_process(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM: the server destroys its sandboxes, then exits; SIGKILL only if it hangs."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
