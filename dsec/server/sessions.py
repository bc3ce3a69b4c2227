"""Persistent shell sessions: one long-lived `sh` per session, so cwd, env, shell variables and `$?` persist.

Each command is written to the shell's stdin as the body of a function `__dsec_cmd`, run by `__dsec_run`
with stdin from /dev/null (so it can never swallow what the host writes next). Around it the shell prints
a start line (the sandbox's uptime, for the interrupt below) and an end line with the exit status on stdout
and an end line on stderr, each behind a random marker; output is read until both end lines are seen.

Why a function: a command that runs past its timeout must be interrupted the way Ctrl-C interrupts it in a
terminal, not by killing the shell (that loses the cwd and environment an agent built up). The host sends
SIGINT to the shell's process group: the command's processes die of it (children get the default
disposition back at exec) and the shell's INT trap `return`s from the function, abandoning the rest of the
command (also a loop of shell builtins), so the shell goes on to print the end lines. A command that
survives SIGINT gets SIGKILL after `INTERRUPT_GRACE_S`: a helper process in the sandbox kills the processes
of the shell's group that started after the command did (background jobs of earlier commands live on). A
shell that still does not answer is killed, and only then does the session end. `on_timeout="kill_session"`
keeps the old behaviour: the timeout kills the shell and ends the session. One limit of the trap: a command cut
inside a shell function of the user's own returns from that function only; what runs after it in the same
command is cut by the SIGKILL stage (or, for a loop of builtins, by ending the session).
"""

from __future__ import annotations

import queue
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Literal

from dsec.errors import InvalidSpec, SessionNotFound
from dsec.server.execution import OutputCap
from dsec.substrates.base import DriverSandbox, Exited, Output, ProcessHandle
from dsec.v1 import sandbox_pb2 as pb

OnTimeout = Literal["interrupt", "kill_session"]
ON_TIMEOUT_MODES: tuple[str, ...] = ("interrupt", "kill_session")
INTERRUPT_GRACE_S = 2.0  # SIGINT → SIGKILL of the command's processes → SIGKILL of the shell, each this far apart
START_TIMEOUT_S = 60.0  # the shell must answer its first line within this (a cold VM guest is the slow case)
USER_HZ = 100  # the clock-tick unit of /proc/<pid>/stat starttime on every Linux architecture dsec runs on

# Defined once per shell. The trap returns only while `__dsec_in` is set, i.e. inside __dsec_run: a SIGINT
# that lands between commands does nothing (a `return` outside a function would end dash and ash).
_PRELUDE = """__dsec_setrc() { return "$1"; }
__dsec_run() {
__dsec_in=1
trap '[ -z "$__dsec_in" ] || return 130' INT
__dsec_cmd
__dsec_r=$?
__dsec_in=
return "$__dsec_r"
}
__dsec_rc=0
"""

# Run by a helper shell spawned in the sandbox when the command survived SIGINT: kill what the session shell's
# group started after the command did. Fields after "comm) " in /proc/<pid>/stat: $3 = process group, $20 = start time in clock ticks.
_KILL_LATE = """pg=$1; t=$2
for f in /proc/[0-9]*/stat; do
  read -r s < "$f" 2>/dev/null || continue
  p=${f#/proc/}; p=${p%/stat}
  [ "$p" = "$pg" ] && continue
  set -- ${s##*) }
  [ "$3" = "$pg" ] || continue
  [ "${20}" -ge "$t" ] 2>/dev/null || continue
  kill -KILL "$p" 2>/dev/null
done
"""


def _print(marker: str, rest: str) -> str:
    """A printf of `marker` (then `rest`: a value, or a redirection) whose source text never holds the marker
    whole: a shell echoing its input (`set -v`, a non-shell that copies stdin) cannot fake an end line."""
    if rest.startswith(">"):
        return f"printf '%s%s\\n' '{marker[:8]}' '{marker[8:]}' {rest}"
    return f"printf '%s%s%s\\n' '{marker[:8]}' '{marker[8:]}' {rest}"


def _drain(process: ProcessHandle) -> None:
    try:
        for _ in process.events():
            pass
    except Exception:  # noqa: BLE001 - a helper whose sandbox went away has nothing left to report
        pass


def check_on_timeout(mode: str) -> OnTimeout:
    """'' means the default; anything else must be one of ON_TIMEOUT_MODES (a typed error, not a surprise later)."""
    if mode == "":
        return "interrupt"
    if mode not in ON_TIMEOUT_MODES:
        raise InvalidSpec(f"on_timeout must be one of {', '.join(ON_TIMEOUT_MODES)} (got {mode!r})")
    return mode  # type: ignore[return-value]


class _Stream:
    """One of the shell's output streams during one command: finds the start and end lines, passes the rest on."""

    def __init__(self, start: bytes | None, end: bytes) -> None:
        self.start, self.end = start, end
        self.buffer = b""
        self.started = start is None
        self.start_value = b""
        self.done = False
        self.end_value = b""

    def feed(self, data: bytes) -> bytes:
        """Return the bytes that are the command's output; keep what may be the start of a marker line."""
        self.buffer += data
        out = b""
        if not self.started:
            index = self.buffer.find(self.start)
            if index < 0:
                return self._keep(out, self.start)
            newline = self.buffer.find(b"\n", index)
            if newline < 0:
                return out
            out, self.start_value = self.buffer[:index], self.buffer[index + len(self.start) : newline]
            self.buffer, self.started = self.buffer[newline + 1 :], True
        index = self.buffer.find(self.end)
        if index < 0:
            return self._keep(out, self.end)
        newline = self.buffer.find(b"\n", index)
        if newline < 0:
            return out + self._take(index)
        self.end_value = self.buffer[index + len(self.end) : newline]
        out += self.buffer[:index]
        self.buffer, self.done = b"", True
        return out

    def _take(self, n: int) -> bytes:
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _keep(self, out: bytes, needle: bytes) -> bytes:
        keep = len(needle) - 1  # the marker may be split across chunks
        return out + self._take(max(len(self.buffer) - keep, 0))

    def rest(self) -> bytes:
        out, self.buffer = self.buffer, b""
        return out


class ShellSession:
    def __init__(
        self,
        sandbox: DriverSandbox,
        session_id: str,
        shell: str,
        env: dict[str, str],
        cwd: str,
        on_timeout: OnTimeout = "interrupt",
    ) -> None:
        self.session_id = session_id
        self.on_timeout = on_timeout
        self._sandbox = sandbox
        self._shell, self._env = shell, env  # the interrupt helper runs the same shell, found on the same PATH
        self._process: ProcessHandle = sandbox.spawn([shell], env, cwd, stdin=True)
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.alive = True
        self._ended_why = "its shell exited"
        threading.Thread(target=self._pump, daemon=True, name=f"dsec-session-{session_id}").start()
        self._shell_pid = self._handshake()

    def _pump(self) -> None:
        try:
            for event in self._process.events():
                self._events.put(event)
        except BaseException as exc:  # noqa: BLE001 - surfaced to the next run()
            self._events.put(exc)
        finally:
            self._events.put(None)

    def _handshake(self) -> str:
        """Define the helpers and learn the shell's pid (= its process group), which the interrupt needs."""
        marker = f"__DSEC_READY_{uuid.uuid4().hex}__"
        self._process.write_stdin(
            (_PRELUDE + _print(marker, '"$$"') + "; " + _print(marker, ">&2") + "\n").encode()
        )
        streams = {"stdout": _Stream(None, marker.encode()), "stderr": _Stream(None, marker.encode())}
        deadline = time.monotonic() + START_TIMEOUT_S
        seen = b""
        while not (streams["stdout"].done and streams["stderr"].done):
            try:
                event = self._events.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                self.close()
                raise InvalidSpec(
                    f"session shell {self._shell!r} did not answer within {START_TIMEOUT_S:.0f} s "
                    f"(sandbox {self._sandbox.sandbox_id}); is it a POSIX shell?"
                ) from None
            if event is None or isinstance(event, (Exited, BaseException)):
                self.alive = False
                raise InvalidSpec(
                    f"session shell {self._shell!r} exited at start (sandbox {self._sandbox.sandbox_id}): "
                    f"{seen[-500:].decode(errors='replace') or event!r}"
                )
            if isinstance(event, Output):
                seen += streams[event.stream].feed(event.data)
        return streams["stdout"].end_value.decode().strip()

    def run(self, command: str, timeout_s: float, max_output_bytes: int) -> Iterator[pb.ExecEvent]:
        if not self.alive:
            raise SessionNotFound(f"session {self.session_id} has ended ({self._ended_why}); start a new one")
        with self._lock:
            yield from self._run_locked(command, timeout_s, max_output_bytes)

    def _script(self, command: str, start: str, end: str) -> bytes:
        return (
            f"__dsec_cmd() {{ __dsec_setrc \"$__dsec_rc\"\n{command}\n}}\n"
            f"read -r __dsec_t0 __dsec_x </proc/uptime 2>/dev/null || __dsec_t0=; "
            + _print(start, '"$__dsec_t0"')
            + "\n__dsec_run </dev/null; __dsec_rc=$?; "
            + _print(end, '"$__dsec_rc"')
            + "; "
            + _print(end, ">&2")
            + "\n"
        ).encode()

    def _run_locked(self, command: str, timeout_s: float, max_output_bytes: int) -> Iterator[pb.ExecEvent]:
        token = uuid.uuid4().hex
        start, end = f"__DSEC_START_{token}__", f"__DSEC_END_{token}__"
        started = time.monotonic()
        next_step = started + timeout_s if timeout_s > 0 else None
        oom_before = self._sandbox.oom_kill_count()
        self._process.write_stdin(self._script(command, start, end))
        streams = {"stdout": _Stream(start.encode(), end.encode()), "stderr": _Stream(None, end.encode())}
        cap = OutputCap(max_output_bytes)
        exit_code, sent = -1, 0
        stage = 0  # 0 running, 1 SIGINT sent, 2 the command's processes SIGKILLed, 3 the shell killed
        while not (streams["stdout"].done and streams["stderr"].done):
            wait = None if next_step is None else max(next_step - time.monotonic(), 0.0)
            try:
                event = self._events.get(timeout=wait)
            except queue.Empty:
                stage += 1
                sent = self._escalate(stage, streams["stdout"])
                if not self.alive:
                    break
                next_step = time.monotonic() + INTERRUPT_GRACE_S
                continue
            if event is None or isinstance(event, (Exited, BaseException)):
                self.alive = False
                if isinstance(event, Exited):
                    exit_code = event.exit_code
                    self._ended_why = f"its shell exited with status {event.exit_code}"
                break
            if not isinstance(event, Output):
                continue
            stream = streams[event.stream]
            if stream.done:
                continue
            data = cap.admit(event.stream, stream.feed(event.data))
            if data:
                yield pb.ExecEvent(**{event.stream: data})
        if streams["stdout"].done:
            exit_code = int(streams["stdout"].end_value or b"-1")
        else:
            for name, stream in streams.items():
                data = cap.admit(name, stream.rest())
                if data:
                    yield pb.ExecEvent(**{name: data})
        oom_after = self._sandbox.oom_kill_count()
        yield pb.ExecEvent(
            status=pb.ExecStatus(
                exit_code=exit_code,
                signal=sent,
                timed_out=stage > 0,
                oom_killed=oom_before >= 0 and oom_after > oom_before,
                duration_s=time.monotonic() - started,
                stdout_truncated=cap.truncated["stdout"],
                stderr_truncated=cap.truncated["stderr"],
                memory_limit_mb=self._sandbox.memory_limit_mb(),
            )
        )

    def _escalate(self, stage: int, stdout: _Stream) -> int:
        """One step of the timeout: returns the signal sent (SIGINT, then SIGKILL)."""
        if self.on_timeout == "kill_session" or stage >= 3:
            why = "on_timeout='kill_session'" if self.on_timeout == "kill_session" else "it ignored SIGINT and SIGKILL"
            self._kill(f"its shell was killed after a command timed out: {why}")
            return signal.SIGKILL
        if stage == 1:
            self._process.signal(signal.SIGINT)
            return signal.SIGINT
        self._kill_late(stdout.start_value.decode(errors="replace").strip())
        return signal.SIGKILL

    def _kill_late(self, uptime: str) -> None:
        """SIGKILL the processes of the shell's group that started after the command (see _KILL_LATE)."""
        try:
            ticks = round(float(uptime) * USER_HZ)
        except ValueError:
            return  # no /proc/uptime in this sandbox: the next stage kills the shell
        try:
            argv = [self._shell, "-c", _KILL_LATE, "dsec-interrupt", self._shell_pid, str(ticks)]
            helper = self._sandbox.spawn(argv, self._env, "/")
        except Exception:  # noqa: BLE001 - the next stage kills the shell
            return
        threading.Thread(target=_drain, args=(helper,), daemon=True, name="dsec-interrupt").start()

    def _kill(self, why: str) -> None:
        self.alive = False
        self._ended_why = why
        try:
            self._process.signal(signal.SIGKILL)
        except Exception:  # noqa: BLE001 - the sandbox may already be gone
            pass

    def close(self) -> None:
        if self.alive:
            self._kill("it was closed")
