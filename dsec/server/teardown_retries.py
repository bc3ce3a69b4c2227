"""Teardowns that failed in a live server, retried with backoff instead of waiting for the next server start.

Why: a destroy whose unmount, cgroup removal or file removal fails (a mount kept busy for a moment, a transient
EIO, a helper that could not start) keeps its durable destroy intent, so the next server start finishes it; but a
server may run for weeks, and until then the sandbox's loop device, mounts and cgroup stay held. So the live server
tries again on its reaper thread, 1 s after the failure, then 2 s, 4 s, ... at most a minute apart, and keeps
counting the sandbox against `max_sandboxes` until it is gone. A server that stops first leaves the intent, as before.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 60.0


@dataclass
class PendingTeardown:
    sandbox: Any  # the manager's ManagedSandbox (not imported: the manager imports this module)
    reason: str
    detail: str
    attempts: int  # failed attempts so far
    due_at: float  # time.monotonic() of the next attempt


class TeardownRetries:
    """The failed teardowns of one server, each with the time of its next attempt (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, PendingTeardown] = {}

    def failed(self, sandbox: Any, reason: str, detail: str, now: float) -> PendingTeardown:
        """Record a failed attempt (the first or a retry's) and schedule the next, twice as far off as the last."""
        with self._lock:
            entry = self._pending.get(sandbox.sandbox_id)
            attempts = 1 if entry is None else entry.attempts + 1
            delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (attempts - 1))
            entry = PendingTeardown(sandbox, reason, detail, attempts, now + delay)
            self._pending[sandbox.sandbox_id] = entry
            return entry

    def take_due(self, now: float) -> list[PendingTeardown]:
        """Remove and return the teardowns whose next attempt is due; a failed one comes back through `failed`."""
        with self._lock:
            due = [entry for entry in self._pending.values() if entry.due_at <= now]
            for entry in due:
                del self._pending[entry.sandbox.sandbox_id]
            return due

    def ids(self) -> set[str]:
        with self._lock:
            return set(self._pending)
