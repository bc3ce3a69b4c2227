"""`sb.processes`: long-lived processes you attach to, detach from, type into and signal (ProcessService).

Why next to `exec`: `exec` is one bounded call whose result is logged; an agent harness also needs a dev
server left running, a REPL or shell on a PTY, a command to re-attach to after a reconnect. A process started
here belongs to the sandbox, not to the Python object: `disconnect()` leaves it running, `processes.connect`
re-attaches (output written meanwhile is not replayed), and it dies with the sandbox.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import grpc

from dsec import wire
from dsec.errors import RuntimeFailure
from dsec.models import ProcessInfo
from dsec.sdk.errors import to_dsec_error
from dsec.v1 import process_pb2 as ppb
from dsec.v1 import process_pb2_grpc as ppb_grpc

if TYPE_CHECKING:
    from dsec.sdk.sandbox import Sandbox


@dataclass(frozen=True)
class ProcessOutput:
    stream: Literal["stdout", "stderr", "pty"]
    data: bytes


@dataclass(frozen=True)
class ProcessResult:
    exit_code: int  # -1 when killed by a signal
    signal: int
    status: str  # "exit status N" | "signal: killed" ...
    stdout: bytes = b""
    stderr: bytes = b""
    pty: bytes = b""
    error: str = ""  # set when the stream failed (e.g. the sandbox died), not for a non-zero exit


def _selector(sandbox_id: str, pid: int | None, tag: str | None) -> ppb.ProcessSelector:
    if (pid is None) == (tag is None):
        raise ValueError("name the process by exactly one of pid or tag")
    return ppb.ProcessSelector(sandbox_id=sandbox_id, pid=pid) if pid is not None else ppb.ProcessSelector(
        sandbox_id=sandbox_id, tag=tag
    )


class Process:
    """An attached process stream. Iterate it for output, `wait()` for the result; `disconnect()` detaches."""

    def __init__(self, processes: Processes, call: grpc.Future) -> None:
        self._processes = processes
        self._call = call
        self.result: ProcessResult | None = None
        first = self._next()
        if first is None or first.WhichOneof("event") != "started":
            self._call.cancel()
            raise RuntimeFailure("the server opened the process stream without a start event")
        self.pid: int = first.started.pid
        self.tag: str = first.started.tag
        self._stdout, self._stderr, self._pty = bytearray(), bytearray(), bytearray()

    def _next(self) -> ppb.ProcessEvent | None:
        try:
            return next(self._call)
        except StopIteration:
            return None
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return None
            raise to_dsec_error(exc) from None

    def __iter__(self) -> Iterator[ProcessOutput]:
        while self.result is None and (event := self._next()) is not None:
            which = event.WhichOneof("event")
            if which == "ended":
                end = event.ended
                self.result = ProcessResult(
                    end.exit_code, end.signal, end.status, bytes(self._stdout), bytes(self._stderr), bytes(self._pty),
                    end.error,
                )  # fmt: skip
                return
            data = getattr(event, which)
            (self._stdout if which == "stdout" else self._stderr if which == "stderr" else self._pty).extend(data)
            yield ProcessOutput(which, data)

    def wait(
        self,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        on_pty: Callable[[bytes], None] | None = None,
    ) -> ProcessResult:
        """Block until the process ends (a non-zero exit is a result, not an error)."""
        callbacks = {"stdout": on_stdout, "stderr": on_stderr, "pty": on_pty}
        for output in self:
            callback = callbacks[output.stream]
            if callback is not None:
                callback(output.data)
        if self.result is None:
            raise RuntimeFailure(f"the stream of process {self.pid} ended without its exit status (disconnected?)")
        return self.result

    def send_input(self, data: bytes | str) -> None:
        self._processes.send_input(data, pid=self.pid)

    def close_stdin(self) -> None:
        self._processes.close_stdin(pid=self.pid)

    def signal(self, sig: int, leader_only: bool = False) -> None:
        self._processes.signal(sig, pid=self.pid, leader_only=leader_only)

    def kill(self) -> None:
        self._processes.kill(pid=self.pid)

    def resize(self, cols: int, rows: int) -> None:
        self._processes.resize(cols, rows, pid=self.pid)

    def disconnect(self) -> None:
        """Stop receiving output; the process runs on (re-attach with `sb.processes.connect(pid=...)`)."""
        self._call.cancel()


class Processes:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox
        self._stub = ppb_grpc.ProcessServiceStub(sandbox._client.channel)

    def _open(self, method: Callable, request: object) -> Process:
        try:
            call = method(request, metadata=self._sb._client.metadata)
        except grpc.RpcError as exc:
            raise to_dsec_error(exc) from None
        return Process(self, call)

    def start(
        self,
        command: str | list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str = "",
        user: str = "",
        pty: tuple[int, int] | None = None,
        tag: str = "",
        stdin: bool = False,
        timeout: float = 0.0,
    ) -> Process:
        """Start a process (a string runs under `/bin/sh -c`); returns once it runs. `pty=(cols, rows)` gives it
        a terminal; `user` is a name in the sandbox's /etc/passwd (default: the sandbox's user); `timeout` > 0
        kills it (its process group) that many seconds after the start, attached or not."""
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        request = ppb.StartProcessRequest(
            sandbox_id=self._sb.id, argv=argv, env=env or {}, cwd=cwd, user=user, tag=tag, stdin=stdin,
            timeout_s=timeout,
        )
        if pty is not None:
            request.pty.CopyFrom(ppb.PtySize(cols=pty[0], rows=pty[1]))
        return self._open(self._stub.Start, request)

    def connect(self, pid: int | None = None, *, tag: str | None = None) -> Process:
        """Re-attach to a running (or recently ended) process: what it writes from now on, then its end."""
        return self._open(self._stub.Connect, _selector(self._sb.id, pid, tag))

    def list(self) -> list[ProcessInfo]:
        """The running processes started through `processes` (not `exec` calls)."""
        reply = self._sb._client.rpc(self._stub.List, ppb.ListProcessesRequest(sandbox_id=self._sb.id))
        return [wire.from_pb_as(ProcessInfo, p) for p in reply.processes]

    def send_input(self, data: bytes | str, *, pid: int | None = None, tag: str | None = None) -> None:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        request = ppb.ProcessInput(process=_selector(self._sb.id, pid, tag), data=raw)
        self._sb._client.rpc(self._stub.SendInput, request)

    def close_stdin(self, *, pid: int | None = None, tag: str | None = None) -> None:
        self._sb._client.rpc(self._stub.CloseStdin, _selector(self._sb.id, pid, tag))

    def signal(self, sig: int, *, pid: int | None = None, tag: str | None = None, leader_only: bool = False) -> None:
        """Signal the process group (default), or only its leader."""
        selector = _selector(self._sb.id, pid, tag)
        request = ppb.SignalProcessRequest(process=selector, signal=sig, leader_only=leader_only)
        self._sb._client.rpc(self._stub.SendSignal, request)

    def kill(self, *, pid: int | None = None, tag: str | None = None) -> None:
        self.signal(9, pid=pid, tag=tag)

    def resize(self, cols: int, rows: int, *, pid: int | None = None, tag: str | None = None) -> None:
        request = ppb.ResizePtyRequest(process=_selector(self._sb.id, pid, tag), size=ppb.PtySize(cols=cols, rows=rows))
        self._sb._client.rpc(self._stub.ResizePty, request)


class AsyncProcess:
    """`Process` for asyncio code: each blocking step runs in a worker thread (the gRPC channel is thread-safe).
    Callbacks given to `wait` run in that thread."""

    def __init__(self, process: Process) -> None:
        self.sync = process
        self.pid = process.pid
        self.tag = process.tag

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        outputs = iter(self.sync)
        while (output := await asyncio.to_thread(next, outputs, None)) is not None:
            yield output

    @property
    def result(self) -> ProcessResult | None:
        return self.sync.result

    async def wait(self, on_stdout=None, on_stderr=None, on_pty=None) -> ProcessResult:  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(self.sync.wait, on_stdout, on_stderr, on_pty)

    async def send_input(self, data: bytes | str) -> None:
        await asyncio.to_thread(self.sync.send_input, data)

    async def close_stdin(self) -> None:
        await asyncio.to_thread(self.sync.close_stdin)

    async def signal(self, sig: int, leader_only: bool = False) -> None:
        await asyncio.to_thread(self.sync.signal, sig, leader_only)

    async def kill(self) -> None:
        await asyncio.to_thread(self.sync.kill)

    async def resize(self, cols: int, rows: int) -> None:
        await asyncio.to_thread(self.sync.resize, cols, rows)

    def disconnect(self) -> None:
        self.sync.disconnect()


class AsyncProcesses:
    """`sb.processes` of an `AsyncSandbox`: the same calls, awaited."""

    def __init__(self, processes: Processes) -> None:
        self.sync = processes

    async def start(self, command: str | list[str], **options: Any) -> AsyncProcess:
        return AsyncProcess(await asyncio.to_thread(self.sync.start, command, **options))

    async def connect(self, pid: int | None = None, *, tag: str | None = None) -> AsyncProcess:
        return AsyncProcess(await asyncio.to_thread(self.sync.connect, pid, tag=tag))

    async def list(self) -> list[ProcessInfo]:
        return await asyncio.to_thread(self.sync.list)

    async def send_input(self, data: bytes | str, **selector: Any) -> None:
        await asyncio.to_thread(self.sync.send_input, data, **selector)

    async def close_stdin(self, **selector: Any) -> None:
        await asyncio.to_thread(self.sync.close_stdin, **selector)

    async def signal(self, sig: int, **options: Any) -> None:
        await asyncio.to_thread(self.sync.signal, sig, **options)

    async def kill(self, **selector: Any) -> None:
        await asyncio.to_thread(self.sync.kill, **selector)

    async def resize(self, cols: int, rows: int, **selector: Any) -> None:
        await asyncio.to_thread(self.sync.resize, cols, rows, **selector)
