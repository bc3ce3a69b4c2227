"""A bounded record of what happened to one sandbox: created, commands and their exit, paused, resumed, timeout
changes. Why: E2B's sandbox logs (`GET /sandboxes/{id}/logs`) and dsec's `Logs` RPC let a user see why a sandbox
behaved as it did without reading the server log, which mixes every tenant's sandboxes."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

MAX_EVENTS = 1000  # per sandbox; the oldest go first
MAX_FIELD = 200  # characters of a command kept in an event


@dataclass(frozen=True)
class SandboxEvent:
    timestamp: float
    level: str  # debug | info | warn | error
    message: str
    fields: dict[str, str] = field(default_factory=dict)


class SandboxEvents:
    """Thread-safe: RPC threads append while another reads."""

    def __init__(self, limit: int = MAX_EVENTS) -> None:
        self._events: deque[SandboxEvent] = deque(maxlen=limit)
        self._lock = threading.Lock()

    def add(self, message: str, level: str = "info", **fields: object) -> None:
        event = SandboxEvent(time.time(), level, message, {k: str(v)[:MAX_FIELD] for k, v in fields.items()})
        with self._lock:
            self._events.append(event)

    def since(self, start: float = 0.0, limit: int = 0) -> list[SandboxEvent]:
        """Events at or after `start` (unix seconds), oldest first; the first `limit` of them when limit > 0."""
        with self._lock:
            found = [e for e in self._events if e.timestamp >= start]
        return found[:limit] if limit > 0 else found
