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

from dsec.pids import pid_alive

log = logging.getLogger("dsec.server.state")

SANDBOX_RECORD = "dsec-sandbox.json"
CLAIMING = ".claiming-"  # a run directory being made: `.claiming-<pid>-<server_id>`, locked, then renamed into place


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
    """A run directory of this server's own, its server.lock held: made under a hidden name, locked, then renamed
    into place, so no other server's reaper ever sees it unlocked. Why: one that did (a server starting on the same
    home in the window between the lock file's creation and its flock) took it for a dead server's: it reaped the
    new, empty directory, or held the lock so that this claim failed with BlockingIOError."""
    server_id = uuid.uuid4().hex[:12]
    run_root.mkdir(parents=True, exist_ok=True)
    staging = run_root / f"{CLAIMING}{os.getpid()}-{server_id}"
    staging.mkdir()
    fd = os.open(staging / "server.lock", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # nobody else looks inside a claiming dir: at once
    os.write(fd, str(os.getpid()).encode())
    run_dir = run_root / server_id
    os.rename(staging, run_dir)  # the lock is on the open file, so it is held under the new name too
    return ServerState(server_id=server_id, run_dir=run_dir, lock_fd=fd)


def run_dirs(run_root: Path) -> list[Path]:
    """The servers' run directories under `run_root` (not the ones being claimed), sorted; a claiming dir whose
    process died before its rename holds nothing but a lock file, and is removed here."""
    found: list[Path] = []
    for path in sorted(run_root.iterdir()) if run_root.is_dir() else []:
        if not path.name.startswith(CLAIMING):
            if path.is_dir():
                found.append(path)
            continue
        pid = path.name.removeprefix(CLAIMING).partition("-")[0]
        if pid.isdigit() and not pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
    return found


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
    for run_dir in run_dirs(run_root):
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
