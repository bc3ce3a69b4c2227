"""Honest lifetimes: what a sandbox that ended answers, and destroys that survive a crash of their server.

Why: RL workers hold sandbox ids across long steps; when one ends they must learn *why* (its timeout, its idle
timeout, an explicit destroy, its node lost) instead of a bare "not found", for a while after the end
(`Tombstones`). And a server killed mid-destroy must not leave the sandbox half torn down, nor let a later
start bring it back: the intent to destroy is written to disk before teardown starts and removed after it
ends (`DestroyIntents`); the next server start finishes every intent whose server is dead.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dsec.errors import SandboxExpired

log = logging.getLogger("dsec.server.lifetimes")

# Test-only fault injection: `DSEC_CRASH_AT=<point>` makes the server kill itself (SIGKILL) at that point, so the
# recovery tests crash it exactly there instead of racing a kill -9 against a destroy.
CRASH_ENV = "DSEC_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        log.warning("%s=%s: killing this server here", CRASH_ENV, name)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Tombstone:
    reason: str  # timeout | idle | destroyed | lost
    detail: str  # what happened, in words
    tenant: str
    ended_at: float


class Tombstones:
    """The ends of recent sandboxes, bounded in number and in age, so memory stays flat under any churn."""

    def __init__(self, limit: int, ttl_s: float) -> None:
        self.limit = max(1, limit)
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, Tombstone] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, sandbox_id: str, reason: str, detail: str, tenant: str, ended_at: float | None = None) -> None:
        with self._lock:
            self._entries.pop(sandbox_id, None)
            self._entries[sandbox_id] = Tombstone(reason, detail, tenant, ended_at if ended_at is not None else time.time())
            self._trim(time.time())

    def _trim(self, now: float) -> None:
        while self._entries and (
            len(self._entries) > self.limit or next(iter(self._entries.values())).ended_at < now - self.ttl_s
        ):
            self._entries.popitem(last=False)

    def get(self, sandbox_id: str, tenant: str | None = None) -> Tombstone | None:
        """The tombstone, if it is still kept and `tenant` (None = the server) may see it."""
        now = time.time()
        with self._lock:
            self._trim(now)
            found = self._entries.get(sandbox_id)
        if found is None or found.ended_at < now - self.ttl_s or (tenant is not None and found.tenant != tenant):
            return None
        return found

    def __contains__(self, sandbox_id: str) -> bool:
        return self.get(sandbox_id) is not None


def expired_error(sandbox_id: str, stone: Tombstone) -> SandboxExpired:
    ago = max(0.0, time.time() - stone.ended_at)
    return SandboxExpired(
        f"sandbox {sandbox_id} ended {ago:.0f}s ago ({stone.reason}: {stone.detail}); create a new one",
        reason=stone.reason, sandbox_id=sandbox_id,
    )  # fmt: skip


class DestroyIntents:
    """One small file per destroy under way: `$DSEC_HOME/destroy-intents/<sandbox_id>.json`.

    Written before teardown starts, removed after it ends. Not fsynced, on purpose: what it guards against is
    the server process dying (kill -9, OOM, a crash), and a file written through the kernel survives that; a
    machine crash takes every sandbox's processes, mounts and cgroups with it, and the run-directory reap covers
    what stays on disk. An fsync would add ~15 ms to every destroy here. A file left behind means its server
    died mid-destroy; `finish_dead` (run at every server start, before anything else looks at old sandboxes)
    completes the teardown from the sandbox's state directory and returns what it finished, so the new server
    can answer for those ids with their reason."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, sandbox_id: str) -> Path:
        return self.root / f"{sandbox_id}.json"

    def record(self, sandbox_id: str, *, driver: str, state_dir: Path, run_dir: Path, reason: str, detail: str,
               tenant: str) -> None:
        body = json.dumps({
            "sandbox_id": sandbox_id, "driver": driver, "state_dir": str(state_dir), "run_dir": str(run_dir),
            "reason": reason, "detail": detail, "tenant": tenant, "at": time.time(),
        }).encode()  # fmt: skip
        tmp = self.root / f".{sandbox_id}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
        os.replace(tmp, self._path(sandbox_id))  # whole or absent, never half-written

    def done(self, sandbox_id: str) -> None:
        self._path(sandbox_id).unlink(missing_ok=True)

    def pending(self) -> list[dict]:
        found = []
        for path in sorted(self.root.glob("sb-*.json")):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                log.warning("unreadable destroy intent %s; removing it (the orphan sweep covers its sandbox)", path)
                path.unlink(missing_ok=True)
        return found

    def pending_ids(self) -> set[str]:
        """Sandboxes that must never be brought back (re-adopted): their destroy had started."""
        return {intent["sandbox_id"] for intent in self.pending()}

    def finish_dead(self, cleanup: Callable[[str, Path], None]) -> list[dict]:
        """Finish every intent whose server is dead; `cleanup(driver, state_dir)` tears a sandbox down from its
        state directory alone. Intents of live servers (another server on this home) are theirs to finish."""
        finished = []
        for intent in self.pending():
            if _server_alive(Path(intent.get("run_dir", ""))):
                continue
            state_dir = Path(intent.get("state_dir", ""))
            try:
                if state_dir.is_dir():
                    cleanup(intent.get("driver", ""), state_dir)
            except Exception:  # noqa: BLE001 - keep the intent: the next start retries, the run-dir reap follows
                log.exception("finishing the destroy of %s failed", intent["sandbox_id"])
                continue
            self.done(intent["sandbox_id"])
            finished.append(intent)
        if finished:
            log.warning("finished %d destroys that dead servers had started: %s", len(finished),
                        ", ".join(i["sandbox_id"] for i in finished))
        return finished


def _server_alive(run_dir: Path) -> bool:
    """A server holds an exclusive flock on its run dir's server.lock while it lives (state.claim_run_dir)."""
    try:
        fd = os.open(run_dir / "server.lock", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we may have taken: the run-dir reap takes it again
    return False
