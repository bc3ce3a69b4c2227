"""Per-sandbox registry of long-lived processes (ProcessService, the E2B envd process API).

Why a registry and not Exec: E2B's clients start a command, drop the stream, re-attach later by pid, list
what runs, type into a PTY and kill it from another call. So a process here belongs to its sandbox, not to a
stream: one pump thread reads its events from the driver and fans them out to every attached subscriber; a
subscriber sees what comes after it attached (nothing is replayed) and then the end. The end is kept for a
while so a late Connect still learns the exit status. Everything dies with the sandbox: `close()` is called
by the manager's destroy, and the agent connection's loss ends every pump.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from dsec.errors import DsecError, InvalidSpec, ProcessNotFound, SandboxStateError
from dsec.substrates.base import Exited, Output, ProcessHandle

log = logging.getLogger("dsec.server.processes")

ENDED_KEPT = 256
"""How many ended processes a sandbox remembers for late Connects (the oldest is forgotten first)."""
SUBSCRIBER_MAX_BYTES = 64 << 20
"""Output queued for one attached stream that does not read; past it that stream is ended with an error
(the process and the other streams go on): a stalled client must not grow the server's memory."""


@dataclass(frozen=True)
class Started:
    pid: int
    tag: str


@dataclass(frozen=True)
class Chunk:
    stream: Literal["stdout", "stderr", "pty"]
    data: bytes


@dataclass(frozen=True)
class Ended:
    exit_code: int
    signal: int = 0
    error: str = ""

    @property
    def status(self) -> str:
        """Go's os.ProcessState wording, which E2B's envd reports and its SDKs show."""
        if self.signal:
            return f"signal: {_SIGNAL_NAMES.get(self.signal, f'signal {self.signal}')}"
        return f"exit status {self.exit_code}"


_SIGNAL_NAMES = {1: "hangup", 2: "interrupt", 3: "quit", 6: "aborted", 9: "killed", 13: "broken pipe", 15: "terminated"}

StreamEvent = Started | Chunk | Ended


class Subscription:
    """One attached stream: Started, the chunks written after it attached, then Ended."""

    def __init__(self, process: ManagedProcess) -> None:
        self.process = process
        self._queue: queue.Queue[StreamEvent] = queue.Queue()
        self._bytes = 0
        self._closed = False

    def put(self, event: StreamEvent) -> None:
        if self._closed:
            return
        if isinstance(event, Chunk):
            self._bytes += len(event.data)
            if self._bytes > SUBSCRIBER_MAX_BYTES:
                self._closed = True
                self._queue.put(Ended(-1, 0, f"more than {SUBSCRIBER_MAX_BYTES} bytes of output were left unread "
                                             "by this stream; it was detached (the process runs on: reconnect)"))
                return
        elif isinstance(event, Ended):
            self._closed = True
        self._queue.put(event)

    def get(self, timeout: float | None = None) -> StreamEvent | None:
        """The next event, or None when `timeout` passes first (callers send keepalives then)."""
        try:
            event = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(event, Chunk):
            self._bytes -= len(event.data)
        return event

    def __iter__(self) -> Iterator[StreamEvent]:
        while True:
            event = self.get()
            assert event is not None
            yield event
            if isinstance(event, Ended):
                return

    def close(self) -> None:
        """Detach (the process runs on)."""
        self._closed = True
        self.process._unsubscribe(self)


@dataclass
class ManagedProcess:
    pid: int
    tag: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    pty: bool
    handle: ProcessHandle
    stdin: bool
    ended: Ended | None = None
    deadline: threading.Timer | None = None
    _subscribers: list[Subscription] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        with self._lock:
            sub.put(Started(self.pid, self.tag))
            if self.ended is not None:
                sub.put(self.ended)
            else:
                self._subscribers.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)

    def _publish(self, event: Chunk | Ended) -> None:
        with self._lock:
            if isinstance(event, Ended):
                self.ended = event
            subscribers = list(self._subscribers)
            if isinstance(event, Ended):
                self._subscribers.clear()
        for sub in subscribers:
            sub.put(event)

    def pump(self, on_end: Callable[[ManagedProcess], None]) -> None:
        """Runs in the process's own thread until it ends (or the sandbox's agent connection is lost)."""
        ended: Ended | None = None
        try:
            for event in self.handle.events():
                if isinstance(event, Output):
                    self._publish(Chunk("pty" if self.pty else event.stream, event.data))
                elif isinstance(event, Exited):
                    ended = Ended(event.exit_code if not event.signal else -1, event.signal)
        except DsecError as exc:
            ended = Ended(-1, 0, exc.message or type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - reported to every attached stream, never a silent hang
            log.exception("process %d pump failed", self.pid)
            ended = Ended(-1, 0, f"{type(exc).__name__}: {exc}")
        self._publish(ended or Ended(-1, 0, "the process's output stream ended without an exit status"))
        if self.deadline is not None:
            self.deadline.cancel()
        on_end(self)

    def kill_if_running(self) -> None:
        if self.ended is None:
            try:
                self.handle.signal(9)
            except DsecError:
                pass  # it ended meanwhile, or the sandbox is going away

    @property
    def running(self) -> bool:
        return self.ended is None

    def _require_running(self) -> None:
        if self.ended is not None:
            raise ProcessNotFound(f"process {self.pid} has ended ({self.ended.status})", pid=self.pid)

    def write(self, data: bytes) -> None:
        self._require_running()
        if not (self.stdin or self.pty):
            raise InvalidSpec(f"process {self.pid} was started without stdin; start it with stdin=True")
        self.handle.write_stdin(data)

    def close_stdin(self) -> None:
        self._require_running()
        if self.pty:
            raise InvalidSpec(f"process {self.pid} runs on a PTY: send Ctrl-D (b'\\x04') to end its input")
        if not self.stdin:
            raise InvalidSpec(f"process {self.pid} was started without stdin; start it with stdin=True")
        self.handle.close_stdin()

    def signal(self, sig: int, group: bool = True) -> None:
        self._require_running()
        self.handle.signal(sig, group=group)

    def resize(self, cols: int, rows: int) -> None:
        self._require_running()
        if not self.pty:
            raise InvalidSpec(f"process {self.pid} has no PTY to resize; start it with a PTY size")
        self.handle.resize(cols, rows)


class ProcessTable:
    """The processes of one sandbox: running ones by pid (and tag), ended ones kept for late Connects."""

    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self._running: dict[int, ManagedProcess] = {}
        self._ended: OrderedDict[int, ManagedProcess] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        self._starting_tags: set[str] = set()  # tags of processes being spawned: unique among running ones too

    def start(
        self,
        spawn: Callable[[], ProcessHandle],
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        tag: str,
        pty: bool,
        stdin: bool,
        timeout_s: float = 0.0,
    ) -> Subscription:
        """Spawn and register a process; the returned subscription sees all of its output from the start.
        With `timeout_s` > 0 its process group is killed that long after the start (as envd does with the
        Connect deadline of the Start call), whether or not anyone is still attached."""
        with self._lock:
            if self._closed:
                raise SandboxStateError(f"sandbox {self.sandbox_id} is being destroyed")
            if tag and (tag in self._starting_tags or any(p.tag == tag for p in self._running.values())):
                raise InvalidSpec(f"a process tagged {tag!r} already runs in sandbox {self.sandbox_id}")
            if tag:
                self._starting_tags.add(tag)
        try:
            handle = spawn()
            process = ManagedProcess(
                pid=int(getattr(handle, "pid", 0)), tag=tag, argv=argv, env=env, cwd=cwd, pty=pty, handle=handle,
                stdin=stdin,
            )  # fmt: skip
            subscription = process.subscribe()  # before the pump starts: the starter misses nothing
            with self._lock:
                self._ended.pop(process.pid, None)  # a reused pid: the new process wins
                self._running[process.pid] = process
        finally:
            with self._lock:
                self._starting_tags.discard(tag)
        threading.Thread(
            target=process.pump, args=(self._on_end,), daemon=True, name=f"dsec-proc-{self.sandbox_id}-{process.pid}"
        ).start()
        if timeout_s > 0:
            process.deadline = threading.Timer(timeout_s, process.kill_if_running)
            process.deadline.daemon = True
            process.deadline.start()
        return subscription

    def _on_end(self, process: ManagedProcess) -> None:
        with self._lock:
            if self._running.get(process.pid) is process:
                del self._running[process.pid]
            self._ended[process.pid] = process
            while len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)

    def find(self, pid: int = 0, tag: str = "") -> ManagedProcess:
        """A running process by pid or tag, else a recently ended one (only by pid or tag as well)."""
        with self._lock:
            for pool in (self._running, self._ended):
                for process in reversed(pool.values()):
                    if (pid and process.pid == pid) or (tag and process.tag == tag):
                        return process
        what = f"pid {pid}" if pid else f"tag {tag!r}"
        raise ProcessNotFound(f"no process with {what} in sandbox {self.sandbox_id}", sandbox_id=self.sandbox_id)

    def running(self) -> list[ManagedProcess]:
        with self._lock:
            return list(self._running.values())

    def close(self) -> None:
        """The sandbox is going away: refuse new processes and kill the running ones (their pumps then end)."""
        with self._lock:
            self._closed = True
            running = list(self._running.values())
        for process in running:
            try:
                process.handle.signal(9)
            except Exception:  # noqa: BLE001 - the sandbox teardown kills it anyway
                pass

