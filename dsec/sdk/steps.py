"""Which trajectory step the next mutating call is: the one thing `Sandbox` needs from `dsec.trajectory(...)`.

Kept apart from trajectory.py so a sandbox stamps step keys without importing the trajectory API (which itself
creates and restores sandboxes).
"""

from __future__ import annotations

import contextvars
from typing import Protocol

from dsec.v1 import sandbox_pb2 as pb


class StepSource(Protocol):
    def _take_step(self, kind: str) -> pb.StepKey: ...


current: contextvars.ContextVar[StepSource | None] = contextvars.ContextVar("dsec_trajectory", default=None)
"""The trajectory the calling context is in (set by `Trajectory.__enter__`)."""


def next_step_key(kind: str) -> pb.StepKey | None:
    """The StepKey for the next mutating call, or None outside `dsec.trajectory(...)`."""
    source = current.get()
    return None if source is None else source._take_step(kind)
