"""Run one process in a sandbox with a deadline and output caps, yielding ExecEvents as output arrives.

The deadline is enforced here, host side, for every substrate: when it passes, the process group is
killed and the output so far is still returned with `timed_out` set — the complaint users have about
peers is losing exactly that output.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from dsec.substrates.base import DriverSandbox, Exited, Output, ProcessEvent, ProcessHandle
from dsec.v1 import sandbox_pb2 as pb

KILL_GRACE_S = 5.0
_CHUNK = 1 << 16


@dataclass
class OutputCap:
    """Counts bytes per stream and cuts what goes over the cap (the process keeps running)."""

    limit: int
    seen: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    truncated: dict[str, bool] = field(default_factory=lambda: {"stdout": False, "stderr": False})

    def admit(self, stream: str, data: bytes) -> bytes:
        room = self.limit - self.seen[stream]
        self.seen[stream] += len(data)
        if room >= len(data):
            return data
        self.truncated[stream] = True
        return data[: max(room, 0)]


def _pump(process: ProcessHandle, stdin: bytes | None, sink: queue.Queue) -> None:
    try:
        if stdin is not None:
            for start in range(0, len(stdin), _CHUNK):
                process.write_stdin(stdin[start : start + _CHUNK])
            process.close_stdin()
        for event in process.events():
            sink.put(event)
    except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer, which raises it
        sink.put(exc)
    finally:
        sink.put(None)


def _direct(process: ProcessHandle) -> Iterator[ProcessEvent | None]:
    """The process's events, then None: what the pump thread would queue, read on the caller's thread."""
    yield from process.events()
    yield None


class _Timed:
    """The process's events read with a timeout on the caller's thread (`ProcessHandle.next_event`), shaped like
    the pump thread's queue: `get` raises queue.Empty when the timeout passes, and gives None after the exit."""

    def __init__(self, process: ProcessHandle) -> None:
        self._process = process
        self._ended = False

    def get(self, timeout: float | None = None) -> ProcessEvent | None:
        if self._ended:
            return None
        event = self._process.next_event(timeout)
        if event is None:
            raise queue.Empty
        self._ended = isinstance(event, Exited)
        return event


def run_process(
    sandbox: DriverSandbox,
    process: ProcessHandle,
    *,
    stdin: bytes | None,
    timeout_s: float,
    max_output_bytes: int,
    oom_kills_before: int,
) -> Iterator[pb.ExecEvent]:
    """Yield stdout/stderr events then one status event. `timeout_s <= 0` means no deadline."""
    started = time.monotonic()
    deadline = started + timeout_s if timeout_s > 0 else None
    events: queue.Queue | _Timed | Iterator[ProcessEvent | None]
    if deadline is None and stdin is None:  # nothing to time or feed: read the events here, no thread or hand-off
        events = _direct(process)
    elif stdin is None and process.timed_events:  # nothing to feed: wait for events with the deadline, here
        events = _Timed(process)
    else:
        events = queue.Queue()
        threading.Thread(target=_pump, args=(process, stdin, events), daemon=True, name="dsec-exec-pump").start()
    cap = OutputCap(max_output_bytes)
    timed_out = False
    exited: Exited | None = None
    kill_deadline: float | None = None
    while True:
        wait = None
        now = time.monotonic()
        if deadline is not None and not timed_out:
            wait = max(deadline - now, 0.0)
        elif kill_deadline is not None:
            wait = max(kill_deadline - now, 0.0)
        try:
            event = events.get(timeout=wait) if isinstance(events, (queue.Queue, _Timed)) else next(events)
        except queue.Empty:
            if not timed_out:
                timed_out = True
                process.signal(signal.SIGKILL)
                kill_deadline = time.monotonic() + KILL_GRACE_S
                continue
            break  # killed but the substrate never reported the exit: give up waiting, report timeout
        if event is None:
            break
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, Output):
            data = cap.admit(event.stream, event.data)
            if data:
                yield pb.ExecEvent(**{event.stream: data})
        elif isinstance(event, Exited):
            exited = event
    oom_after = sandbox.oom_kill_count()
    oom = oom_kills_before >= 0 and oom_after > oom_kills_before
    status = pb.ExecStatus(
        exit_code=exited.exit_code if exited else -1,
        signal=exited.signal if exited else signal.SIGKILL,
        timed_out=timed_out,
        oom_killed=oom and not timed_out,
        duration_s=time.monotonic() - started,
        stdout_truncated=cap.truncated["stdout"],
        stderr_truncated=cap.truncated["stderr"],
        memory_limit_mb=sandbox.memory_limit_mb(),
    )
    yield pb.ExecEvent(status=status)
