"""What a process or a directory watch inside a sandbox yields, and the handles that yield it.

Defined here, beside the agent that produces them, so the agent's host side needs nothing from the substrate
layer above it; `dsec.substrates.base` re-exports them for drivers and the server.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from dsec.errors import Unsupported


@dataclass(frozen=True)
class Output:
    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class Exited:
    exit_code: int
    signal: int = 0


ProcessEvent = Output | Exited


@dataclass(frozen=True)
class FsEvent:
    """One change seen by a directory watch: kind is create | write | remove | rename | chmod; name is relative
    to the watched directory."""

    kind: str
    name: str


class DirWatch(abc.ABC):
    """A live watch on a directory inside a sandbox. `events()` yields FsEvents until `cancel()` is called or
    the directory goes away; both end the iterator."""

    @abc.abstractmethod
    def events(self) -> Iterator[FsEvent]: ...

    @abc.abstractmethod
    def cancel(self) -> None: ...


class ProcessHandle(abc.ABC):
    """A process started in a sandbox. `events()` yields Output chunks as they come, then exactly one Exited."""

    timed_events: bool = False  # whether `next_event` works (else only `events()`)

    @abc.abstractmethod
    def events(self) -> Iterator[ProcessEvent]: ...

    def next_event(self, timeout: float | None) -> ProcessEvent | None:
        """The next event of `events()`, or None when `timeout` seconds pass first; not mixed with `events()`.
        Why: the exec engine's deadline then waits on the caller's thread, where otherwise a pump thread reads
        `events()` and hands each event over (a thread start and a hand-off per exec; where `timed_events`)."""
        raise Unsupported("this process handle has no timed reads; iterate events()")

    @abc.abstractmethod
    def write_stdin(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def close_stdin(self) -> None: ...

    @abc.abstractmethod
    def signal(self, sig: int, group: bool = True) -> None:
        """Signal the whole process group (so `sh -c` children die too), or with group=False the process alone."""

    def resize(self, cols: int, rows: int) -> None:
        """Set the window size of a process started with a PTY (it gets SIGWINCH)."""
        raise Unsupported("this process has no PTY to resize")
