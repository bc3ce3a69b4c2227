"""Persistent shell sessions: one long-lived `sh` per session, so cwd, env and shell variables persist.

Each command is written to the shell's stdin wrapped as `{ cmd\n} </dev/null`, followed by printing a
random end marker with the exit status on stdout and a marker on stderr; output is read until both
markers are seen. The command's own stdin is /dev/null so it can never swallow the markers.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
import uuid
from collections.abc import Iterator

from dsec.errors import SessionNotFound
from dsec.server.execution import OutputCap
from dsec.substrates.base import DriverSandbox, Exited, Output, ProcessHandle
from dsec.v1 import sandbox_pb2 as pb


class ShellSession:
    def __init__(self, sandbox: DriverSandbox, session_id: str, shell: str, env: dict[str, str], cwd: str) -> None:
        self.session_id = session_id
        self._sandbox = sandbox
        self._process: ProcessHandle = sandbox.spawn([shell], env, cwd, stdin=True)
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.alive = True
        threading.Thread(target=self._pump, daemon=True, name=f"dsec-session-{session_id}").start()

    def _pump(self) -> None:
        try:
            for event in self._process.events():
                self._events.put(event)
        except BaseException as exc:  # noqa: BLE001 - surfaced to the next run()
            self._events.put(exc)
        finally:
            self._events.put(None)

    def run(self, command: str, timeout_s: float, max_output_bytes: int) -> Iterator[pb.ExecEvent]:
        if not self.alive:
            raise SessionNotFound(
                f"session {self.session_id} has ended (its shell exited or was killed after a timeout); start a new one"
            )
        with self._lock:
            yield from self._run_locked(command, timeout_s, max_output_bytes)

    def _run_locked(self, command: str, timeout_s: float, max_output_bytes: int) -> Iterator[pb.ExecEvent]:
        marker = f"__DSEC_END_{uuid.uuid4().hex}__"
        script = (
            f"{{ {command}\n}} </dev/null\n"
            f"__dsec_rc=$?; printf '%s%s\\n' '{marker}' \"$__dsec_rc\"; printf '%s\\n' '{marker}' >&2\n"
        )
        started = time.monotonic()
        deadline = started + timeout_s if timeout_s > 0 else None
        oom_before = self._sandbox.oom_kill_count()
        self._process.write_stdin(script.encode())
        buffers = {"stdout": b"", "stderr": b""}
        done = {"stdout": False, "stderr": False}
        cap = OutputCap(max_output_bytes)
        exit_code = -1
        timed_out = False
        needle = marker.encode()
        while not (done["stdout"] and done["stderr"]):
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                event = self._events.get(timeout=wait)
            except queue.Empty:
                timed_out = True
                self.alive = False
                self._process.signal(signal.SIGKILL)
                break
            if event is None or isinstance(event, (Exited, BaseException)):
                self.alive = False
                if isinstance(event, Exited):
                    exit_code = event.exit_code
                break
            if not isinstance(event, Output) or done[event.stream]:
                continue
            stream = event.stream
            buffers[stream] += event.data
            index = buffers[stream].find(needle)
            if index >= 0:
                tail = buffers[stream][index + len(needle) :]
                emit, done[stream] = buffers[stream][:index], True
                if stream == "stdout":
                    exit_code = int(tail.split(b"\n", 1)[0] or b"-1")
            else:
                keep = len(needle) - 1  # the marker may be split across chunks
                emit, buffers[stream] = buffers[stream][:-keep] if keep else buffers[stream], buffers[stream][-keep:]
            data = cap.admit(stream, emit)
            if data:
                yield pb.ExecEvent(**{stream: data})
        if timed_out or not self.alive:
            for stream in ("stdout", "stderr"):
                data = cap.admit(stream, buffers[stream]) if not done[stream] else b""
                if data:
                    yield pb.ExecEvent(**{stream: data})
        oom_after = self._sandbox.oom_kill_count()
        yield pb.ExecEvent(
            status=pb.ExecStatus(
                exit_code=exit_code,
                timed_out=timed_out,
                oom_killed=oom_before >= 0 and oom_after > oom_before,
                duration_s=time.monotonic() - started,
                stdout_truncated=cap.truncated["stdout"],
                stderr_truncated=cap.truncated["stderr"],
                memory_limit_mb=self._sandbox.memory_limit_mb(),
            )
        )

    def close(self) -> None:
        if self.alive:
            self.alive = False
            try:
                self._process.signal(signal.SIGKILL)
            except Exception:  # noqa: BLE001 - the sandbox may already be gone
                pass
