"""ProcessService: gRPC glue over each sandbox's ProcessTable (dsec/server/processes.py).

The caller names a user by name; it is looked up in the sandbox's own /etc/passwd (read through the agent, so
users added at run time count; the same `Accounts` as FilesystemService) and the process runs with that uid/gid,
HOME, USER and LOGNAME, starting in the home directory unless a cwd is given: the shape of E2B's envd, whose API
maps onto this service.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from dsec import wire
from dsec.errors import CapacityExceeded, DsecError, InvalidSpec, ProcessNotFound
from dsec.models import ProcessInfo
from dsec.server.auth import Authenticator
from dsec.server.errors import rpc_errors
from dsec.server.filesystem_service import Accounts
from dsec.server.manager import ManagedSandbox, SandboxManager
from dsec.server.paths import sandbox_path
from dsec.server.processes import Chunk, Ended, ManagedProcess, Started, Subscription
from dsec.v1 import process_pb2 as ppb
from dsec.v1 import process_pb2_grpc as ppb_grpc
from dsec.v1 import sandbox_pb2 as pb

MAX_INPUT = 1 << 20
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a sandbox lives at most this long too
POLL_S = 1.0  # how often an idle attached stream checks that its client is still there
STREAM_SHARE_OF_WORKERS = 2  # at most workers / 2 attached streams: each holds an RPC thread while it is open


def _event_pb(event: Started | Chunk | Ended) -> ppb.ProcessEvent:
    if isinstance(event, Started):
        return ppb.ProcessEvent(started=ppb.ProcessStarted(pid=event.pid, tag=event.tag))
    if isinstance(event, Chunk):
        return ppb.ProcessEvent(**{event.stream: event.data})
    return ppb.ProcessEvent(
        ended=ppb.ProcessEnded(exit_code=event.exit_code, signal=event.signal, status=event.status, error=event.error)
    )


def stream_events(subscription: Subscription, context: grpc.ServicerContext) -> Iterator[ppb.ProcessEvent]:
    """Forward a subscription until the end event or until the client goes away (then detach, never kill)."""
    try:
        while context.is_active():
            event = subscription.get(timeout=POLL_S)
            if event is None:
                continue
            yield _event_pb(event)
            if isinstance(event, Ended):
                return
    finally:
        subscription.close()


class ProcessService(ppb_grpc.ProcessServiceServicer):
    def __init__(self, manager: SandboxManager, auth: Authenticator | None = None) -> None:
        self.manager = manager
        self.auth = auth or Authenticator({})
        self.max_streams = max(1, manager.config.workers // STREAM_SHARE_OF_WORKERS)
        self._streams = threading.BoundedSemaphore(self.max_streams)

    def _stream_slot(self) -> None:
        """Take a slot for one attached stream, or refuse at once: past the cap, streams that never end would
        hold every RPC thread and hang every other call on the server."""
        if not self._streams.acquire(blocking=False):
            raise CapacityExceeded(
                f"this server has {self.max_streams} process streams attached (each holds an RPC thread); detach "
                "some (a background handle's disconnect()), or raise the server's workers",
                retry_after_s=1.0,
            )

    def _attached(self, subscription: Subscription, context: grpc.ServicerContext) -> Iterator[ppb.ProcessEvent]:
        once = threading.Lock()

        def release() -> None:  # once: when the RPC ends (a cancel lands here at once) or the stream returns
            if once.acquire(blocking=False):
                subscription.close()
                self._streams.release()

        context.add_callback(release)
        try:
            yield from stream_events(subscription, context)
        finally:
            release()

    def _sandbox(self, sandbox_id: str, context: grpc.ServicerContext) -> ManagedSandbox:
        return self.manager.running(sandbox_id, self.auth.tenant(context))

    def _process(self, selector: ppb.ProcessSelector, context: grpc.ServicerContext) -> ManagedProcess:
        sandbox = self._sandbox(selector.sandbox_id, context)
        which = selector.WhichOneof("selector")
        if which is None or (which == "pid" and not selector.pid) or (which == "tag" and not selector.tag):
            raise InvalidSpec("name the process by a non-zero pid or a non-empty tag")
        return sandbox.processes.find(pid=selector.pid, tag=selector.tag)

    def _running(self, selector: ppb.ProcessSelector, context: grpc.ServicerContext) -> ManagedProcess:
        process = self._process(selector, context)
        if not process.running:
            raise ProcessNotFound(f"process {process.pid} has ended ({process.ended.status})", pid=process.pid)
        return process

    @rpc_errors
    def Start(self, request: ppb.StartProcessRequest, context: grpc.ServicerContext) -> Iterator[ppb.ProcessEvent]:
        sandbox = self._sandbox(request.sandbox_id, context)
        if not request.argv or not request.argv[0]:
            raise InvalidSpec("argv must name the command to run")
        pty = None
        if request.HasField("pty"):
            pty = (request.pty.cols, request.pty.rows)
            if not (1 <= pty[0] <= 65535 and 1 <= pty[1] <= 65535):
                raise InvalidSpec(f"PTY size {pty[0]}x{pty[1]} out of range: cols and rows must be 1-65535")
        env = sandbox.default_env()
        cwd = sandbox.default_cwd()
        user = None
        if request.user:
            account = Accounts(sandbox).account(request.user)  # the sandbox's /etc/passwd, as file calls use it
            user, cwd = account.owner, account.home
            env |= {"HOME": account.home, "USER": request.user, "LOGNAME": request.user}
        env |= dict(request.env)
        if request.cwd:
            cwd = sandbox_path(request.cwd, cwd)
        argv = list(request.argv)

        def spawn():
            try:
                return sandbox.handle.spawn(argv, env, cwd, stdin=request.stdin, pty=pty, user=user)
            except DsecError as exc:
                if not exc.message.startswith("chdir"):
                    raise
                if request.cwd:  # the caller's directory: a bad argument (envd answers INVALID_ARGUMENT too)
                    raise InvalidSpec(f"cannot start in {cwd}: {exc.message}", sandbox_id=sandbox.sandbox_id) from None
                # a home that does not exist: envd starts in / then
                return sandbox.handle.spawn(argv, env, "/", stdin=request.stdin, pty=pty, user=user)

        if not 0 <= request.timeout_s <= MAX_TIMEOUT_S:  # NaN fails this too
            raise InvalidSpec(f"timeout_s must be between 0 (no limit) and {MAX_TIMEOUT_S:.0f} seconds")
        self._stream_slot()
        try:
            subscription = sandbox.processes.start(
                spawn, argv, dict(request.env), request.cwd or cwd, request.tag, pty is not None, request.stdin,
                request.timeout_s,
            )
        except BaseException:
            self._streams.release()
            raise
        yield from self._attached(subscription, context)

    @rpc_errors
    def Connect(self, request: ppb.ProcessSelector, context: grpc.ServicerContext) -> Iterator[ppb.ProcessEvent]:
        process = self._process(request, context)
        self._stream_slot()
        yield from self._attached(process.subscribe(), context)

    @rpc_errors
    def List(self, request: ppb.ListProcessesRequest, context: grpc.ServicerContext) -> ppb.ListProcessesResponse:
        sandbox = self._sandbox(request.sandbox_id, context)
        return ppb.ListProcessesResponse(
            processes=[
                wire.to_pb(ProcessInfo(pid=p.pid, tag=p.tag, argv=p.argv, env=p.env, cwd=p.cwd, pty=p.pty))
                for p in sorted(sandbox.processes.running(), key=lambda p: p.pid)
            ]
        )

    @rpc_errors
    def SendInput(self, request: ppb.ProcessInput, context: grpc.ServicerContext) -> pb.Empty:
        if len(request.data) > MAX_INPUT:
            raise InvalidSpec(f"input larger than {MAX_INPUT} bytes; send it in pieces")
        self._running(request.process, context).write(request.data)
        return pb.Empty()

    @rpc_errors
    def CloseStdin(self, request: ppb.ProcessSelector, context: grpc.ServicerContext) -> pb.Empty:
        self._running(request, context).close_stdin()
        return pb.Empty()

    @rpc_errors
    def SendSignal(self, request: ppb.SignalProcessRequest, context: grpc.ServicerContext) -> pb.Empty:
        if not 1 <= request.signal <= 64:
            raise InvalidSpec(f"signal {request.signal} is not a Linux signal number (1-64)")
        self._running(request.process, context).signal(request.signal, group=not request.leader_only)
        return pb.Empty()

    @rpc_errors
    def ResizePty(self, request: ppb.ResizePtyRequest, context: grpc.ServicerContext) -> pb.Empty:
        cols, rows = request.size.cols, request.size.rows
        if not (1 <= cols <= 65535 and 1 <= rows <= 65535):
            raise InvalidSpec(f"PTY size {cols}x{rows} out of range: cols and rows must be 1-65535")
        self._running(request.process, context).resize(cols, rows)
        return pb.Empty()


def add_process_service(server: grpc.Server, manager: SandboxManager, auth: Authenticator | None = None) -> None:
    ppb_grpc.add_ProcessServiceServicer_to_server(ProcessService(manager, auth), server)

