"""Per-server state directories, so a server killed with -9 leaves enough behind to be cleaned up.

Layout: `$DSEC_HOME/run/<server_id>/server.lock` (flock held while the server lives) and one directory per
sandbox holding `dsec-sandbox.json` (driver name + whatever the driver needs to tear it down). A starting server
takes every run directory whose lock it can grab (its owner is dead) and destroys what it describes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("dsec.server.state")

SANDBOX_RECORD = "dsec-sandbox.json"


@dataclass
class ServerState:
    server_id: str
    run_dir: Path
    lock_fd: int

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.run_dir / sandbox_id

    def release(self) -> None:
        """Drop the lock and the run directory at clean shutdown. A sandbox whose destroy failed keeps its
        directory (and records), so the next server start finishes its cleanup instead of losing track of it."""
        if any(p.is_dir() for p in self.run_dir.iterdir()):
            (self.run_dir / "server.lock").unlink(missing_ok=True)
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        os.close(self.lock_fd)


def claim_run_dir(run_root: Path) -> ServerState:
    server_id = uuid.uuid4().hex[:12]
    run_dir = run_root / server_id
    run_dir.mkdir(parents=True)
    fd = os.open(run_dir / "server.lock", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, str(os.getpid()).encode())
    return ServerState(server_id=server_id, run_dir=run_dir, lock_fd=fd)


def write_sandbox_record(sandbox_dir: Path, record: dict) -> None:
    sandbox_dir.mkdir(parents=True, exist_ok=True)
    tmp = sandbox_dir / (SANDBOX_RECORD + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, sandbox_dir / SANDBOX_RECORD)


def unmount_below(path: Path) -> None:
    """Lazily unmount every mount at or under `path`, deepest first (a last resort for half-deleted state)."""
    prefix = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].encode().decode("unicode_escape") for line in mounts]
    for point in sorted((p for p in points if p == prefix or p.startswith(prefix + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def reap_dead_servers(run_root: Path, cleanup: Callable[[str, Path], None]) -> list[str]:
    """Clean every sandbox of every dead server under `run_root`; returns the sandbox ids cleaned.

    `cleanup(driver_name, sandbox_dir)` tears one sandbox down from its directory alone.
    """
    cleaned: list[str] = []
    if not run_root.exists():
        return cleaned
    for run_dir in sorted(p for p in run_root.iterdir() if p.is_dir()):
        lock_path = run_dir / "server.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            fd = None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # its server is alive
        try:
            try:
                sandbox_dirs = sorted(p for p in run_dir.iterdir() if p.is_dir())
            except FileNotFoundError:
                continue  # another server of this home reaped it first (a run dir without lock has no owner to wait on)
            for sandbox_dir in sandbox_dirs:
                record_path = sandbox_dir / SANDBOX_RECORD
                driver = ""
                if record_path.exists():
                    try:
                        driver = json.loads(record_path.read_text()).get("driver", "")
                    except (OSError, ValueError):
                        driver = ""
                try:
                    cleanup(driver, sandbox_dir)
                except Exception:  # noqa: BLE001 - keep cleaning the rest; the next start retries
                    log.exception("cleanup of %s failed", sandbox_dir)
                    continue
                unmount_below(sandbox_dir)  # whatever the driver's records no longer describe
                shutil.rmtree(sandbox_dir, ignore_errors=True)
                cleaned.append(sandbox_dir.name)
            with contextlib.suppress(FileNotFoundError):
                if not any(p.is_dir() for p in run_dir.iterdir()):
                    shutil.rmtree(run_dir, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)
    return cleaned
