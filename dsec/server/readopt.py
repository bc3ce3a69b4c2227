"""Re-adopt, don't reap: a server started after a crash re-attaches the healthy sandboxes dead servers left.

Why: a server killed -9 or upgraded in place used to take every sandbox with it (its successor reaped them), so
an RL run lost every rollout in flight for a restart that its sandboxes themselves survived: a container's agent,
cgroup, mounts and netns live on without their server. Now the successor probes each one (driver `adopt`: the
agent answers a ping within a bound, its cgroup is there with its PID 1 in it, its mounts are in place) and
serves the healthy ones under the same id, tenant, labels, absolute expiry and files; the rest are reaped as
before, and so is everything without a record (orphans.sweep).

What a sandbox's record (`dsec-sandbox.json`, state.py) must hold for that: `live` (it was handed to a client:
pooled sandboxes and creates in flight are reaped, never adopted), its spec, `created_at`, `expires_at`, `state`
(running | paused) and `parked`. `save_record` writes them at create and claim and whenever they change.

How ownership moves: the dead server's run directory is taken over whole. The new server takes the flock on its
`server.lock` — atomic, and exactly what every other server, the destroy-intent finisher and the orphan sweep read
as "its owner is alive" — and holds it for its own life. The state directories stay where they are, because a
running sandbox has their paths baked in (the OCI runtime's bundle and state, mount points, loop devices), and the
machine-wide registry entries (orphans.py) already point at them. At clean shutdown the adopted run directory is
released like the server's own; if the new server dies too, the next one takes over both.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from dsec.server import orphans
from dsec.server.state import SANDBOX_RECORD, ServerState, run_dirs, unmount_below

if TYPE_CHECKING:
    from dsec.server.manager import ManagedSandbox

log = logging.getLogger("dsec.server.readopt")

LOCK_NAME = "server.lock"
PARALLEL = 8  # sandboxes probed at once: a function sandbox's worker start takes ~0.5 s, a ping milliseconds


def save_record(sandbox: ManagedSandbox) -> None:
    """Write what re-adoption needs into the sandbox's record; called under `sandbox.lock` or before anyone else
    sees it. Never recreates the state directory of a sandbox being torn down."""
    path = sandbox.state_dir / SANDBOX_RECORD
    if sandbox.state == "destroyed":
        return
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {}
    record |= {
        "driver": sandbox.driver_name, "sandbox_id": sandbox.sandbox_id, "image": sandbox.image.digest,
        "tenant": sandbox.tenant, "live": True, "spec": sandbox.spec.model_dump(mode="json"),
        "created_at": sandbox.created_at, "expires_at": sandbox.expires_at, "state": sandbox.state,
        "parked": sandbox.parked,
    }  # fmt: skip
    tmp = path.with_name(SANDBOX_RECORD + ".tmp")
    try:
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except FileNotFoundError:
        pass  # its state directory is gone: the sandbox was destroyed meanwhile


def _take_lock(run_dir: Path) -> int | None:
    """Hold `run_dir`'s server.lock if its server is dead (nobody holds it); None if it is alive or has none."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None  # no lock: a server that exited cleanly left sandboxes whose destroy failed; the reap finishes them
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)  # as claim_run_dir does: the file names the server that holds it
    return fd


def _read_record(sandbox_dir: Path) -> dict:
    try:
        return json.loads((sandbox_dir / SANDBOX_RECORD).read_text())
    except (OSError, ValueError):
        return {}


def take_over(
    run_root: Path,
    own_run_dir: Path,
    never: set[str],
    adopt: Callable[[dict, Path], object],
    reap: Callable[[str, Path], None],
) -> tuple[list[ServerState], list[str], list[str]]:
    """Take over every dead server's run directory under `run_root`: adopt each live sandbox (`adopt(record,
    state_dir)` raises if it is not healthy), reap the others (`reap(driver, state_dir)`), and never adopt an id
    in `never` (its destroy had started). Returns the run directories now held, the ids adopted and the ids reaped.
    """
    held: list[ServerState] = []
    adopted: list[str] = []
    reaped: list[str] = []
    if not run_root.is_dir():
        return held, adopted, reaped
    for run_dir in (p for p in run_dirs(run_root) if p != own_run_dir):
        fd = _take_lock(run_dir)
        if fd is None:
            continue
        try:
            sandbox_dirs = sorted(p for p in run_dir.iterdir() if p.is_dir())
        except FileNotFoundError:  # another server of this home took it over and emptied it before we held the lock
            os.close(fd)
            continue

        def one(sandbox_dir: Path) -> bool:
            record = _read_record(sandbox_dir)
            sandbox_id = sandbox_dir.name
            if record.get("live") and record.get("spec") and sandbox_id not in never:
                try:
                    if orphans.registered_dir(sandbox_id) != sandbox_dir.resolve():
                        orphans.register(sandbox_id, sandbox_dir)
                    adopt(record, sandbox_dir)
                    return True
                except Exception as exc:  # noqa: BLE001 - not healthy: reaped below like any dead server's sandbox
                    log.warning("sandbox %s of dead server %s is not healthy (%s); reaping it", sandbox_id,
                                run_dir.name, exc)
            try:
                reap(record.get("driver", ""), sandbox_dir)
            except Exception:  # noqa: BLE001 - still registered, its dir kept: the next start retries
                log.exception("reaping %s failed", sandbox_dir)
                return False
            unmount_below(sandbox_dir)
            shutil.rmtree(sandbox_dir, ignore_errors=True)
            return False

        with ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="dsec-readopt") as pool:
            outcomes = list(pool.map(one, sandbox_dirs))
        for sandbox_dir, ok in zip(sandbox_dirs, outcomes):
            (adopted if ok else reaped).append(sandbox_dir.name)
        state = ServerState(server_id=run_dir.name, run_dir=run_dir, lock_fd=fd)
        if any(ok for ok in outcomes):
            held.append(state)
        else:
            state.release()  # nothing adopted: the directory goes (or keeps only what failed to reap, lock-less)
    if adopted or reaped:
        log.warning("re-adopted %d sandboxes of dead servers (%s); reaped %d that were not healthy or not live (%s)",
                    len(adopted), ", ".join(adopted), len(reaped), ", ".join(reaped))
    return held, adopted, reaped
