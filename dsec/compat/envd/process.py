"""envd's `process.Process` Connect service, served as calls on dsec's ProcessService.

Every envd call maps to one ProcessService call for the sandbox of `E2b-Sandbox-Id`, as the tenant of the
key the sandbox was created with: Start/Connect stream its events (with envd's keepalives while a process is
quiet), List/SendInput/StreamInput/CloseStdin/SendSignal/Update(PTY resize) are unary. Semantics follow
envd's: commands run as `Authorization: Basic <user>:` (E2B's default user `user` when the header is absent,
or the sandbox's own user on an image without one), in that user's home unless a cwd is given; the Start
call's Connect deadline kills the process; a process that ended answers NOT_FOUND to input and signals (so
`kill()` returns False), while Connect still reports how it ended.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint

from dsec.compat.context import CompatContext
from dsec.compat.envd.rpc import (
    caller,
    envd_codecs,
    envd_user,
    keepalive_interval,
    scoped,
    to_connect_error,
    with_idle_ticks,
)
from dsec.envd.process import process_pb2 as epb
from dsec.v1 import process_pb2 as ppb
from dsec.v1 import process_pb2_grpc as ppb_grpc

SERVICE = "process.Process"
DEFAULT_USER = "user"  # envd's default when the SDK sends no user
MAX_DEADLINE_S = 7 * 24 * 3600.0  # ProcessService's limit; a longer Start deadline is as good as none


def _event(event: ppb.ProcessEvent) -> epb.ProcessEvent:
    which = event.WhichOneof("event")
    if which == "started":
        return epb.ProcessEvent(start=epb.ProcessEvent.StartEvent(pid=event.started.pid))
    if which in ("stdout", "stderr", "pty"):
        return epb.ProcessEvent(data=epb.ProcessEvent.DataEvent(**{which: getattr(event, which)}))
    end = event.ended
    clean = end.signal == 0 and not end.error
    out = epb.ProcessEvent.EndEvent(exit_code=end.exit_code, exited=clean, status=end.status)
    if end.error:
        out.error = end.error
    elif end.exit_code != 0 or end.signal:
        out.error = end.status  # Go's cmd.Wait error text, as envd reports it
    return epb.ProcessEvent(end=out)


_KEEPALIVE = epb.ProcessEvent(keepalive=epb.ProcessEvent.KeepAlive())


async def _messages(call) -> AsyncIterator[ppb.ProcessEvent]:
    """A gRPC aio stream through `read()` (its iterator may not be mixed with the first `read()` of Start)."""
    while (message := await call.read()) is not grpc.aio.EOF:
        yield message


def _selector(sandbox_id: str, selector: epb.ProcessSelector) -> ppb.ProcessSelector:
    which = selector.WhichOneof("selector")
    if which == "pid":
        return ppb.ProcessSelector(sandbox_id=sandbox_id, pid=selector.pid)
    if which == "tag":
        return ppb.ProcessSelector(sandbox_id=sandbox_id, tag=selector.tag)
    raise ConnectError(Code.INVALID_ARGUMENT, "process selector needs a pid or a tag")


class ProcessHandler:
    def __init__(self, ctx: CompatContext) -> None:
        self.ctx = ctx

    def _stub(self) -> tuple[str, ppb_grpc.ProcessServiceStub]:
        who = caller()
        return who.sandbox_id, self.ctx.stub(ppb_grpc.ProcessServiceStub, who.api_key)

    async def _unary(self, method: str, request: object) -> None:
        _, stub = self._stub()
        try:
            await getattr(stub, method)(request)
        except grpc.RpcError as exc:
            raise to_connect_error(exc) from None

    async def _events(self, call, ctx: RequestContext) -> AsyncIterator[epb.ProcessEvent]:
        try:
            async for event in with_idle_ticks(_messages(call), keepalive_interval(ctx)):
                yield _KEEPALIVE if event is None else _event(event)
        except grpc.RpcError as exc:
            raise to_connect_error(exc) from None
        finally:
            call.cancel()  # the client went away (or the stream ended): detach, never kill

    async def _open(self, stub: ppb_grpc.ProcessServiceStub, request: ppb.StartProcessRequest):
        """Start and wait for the first event, so a start error is a Connect error, not a broken stream."""
        call = stub.Start(request)
        try:
            first = await call.read()
        except grpc.RpcError:
            call.cancel()
            raise
        if first is grpc.aio.EOF:
            raise ConnectError(Code.INTERNAL, "the process stream ended before the process started")
        return first, call

    async def start(self, request: epb.StartRequest, ctx: RequestContext) -> AsyncIterator[epb.StartResponse]:
        sandbox_id, stub = self._stub()
        config = request.process
        if not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is empty")
        user = envd_user(ctx)
        start = ppb.StartProcessRequest(
            sandbox_id=sandbox_id,
            argv=[config.cmd, *config.args],
            env=dict(config.envs),
            cwd=config.cwd if config.HasField("cwd") else "",
            user=user or DEFAULT_USER,
            tag=request.tag if request.HasField("tag") else "",
            stdin=request.stdin if request.HasField("stdin") else True,  # envd's default for old SDKs
        )
        if request.HasField("pty"):
            start.pty.CopyFrom(ppb.PtySize(cols=request.pty.size.cols, rows=request.pty.size.rows))
        remaining_ms = ctx.timeout_ms
        if remaining_ms is not None:
            start.timeout_s = min(max(remaining_ms, 1.0) / 1000.0, MAX_DEADLINE_S)
        try:
            try:
                first, call = await self._open(stub, start)
            except grpc.RpcError as exc:
                if user is None and grpc_code_is_missing_user(exc):
                    start.user = ""  # an image without E2B's `user`: run as the sandbox's own user
                    first, call = await self._open(stub, start)
                else:
                    raise
        except grpc.RpcError as exc:
            raise to_connect_error(exc) from None
        yield epb.StartResponse(event=_event(first))
        async for event in self._events(call, ctx):
            yield epb.StartResponse(event=event)

    async def connect(self, request: epb.ConnectRequest, ctx: RequestContext) -> AsyncIterator[epb.ConnectResponse]:
        sandbox_id, stub = self._stub()
        call = stub.Connect(_selector(sandbox_id, request.process))
        async for event in self._events(call, ctx):
            yield epb.ConnectResponse(event=event)

    async def list(self, request: epb.ListRequest, ctx: RequestContext) -> epb.ListResponse:
        sandbox_id, stub = self._stub()
        try:
            reply = await stub.List(ppb.ListProcessesRequest(sandbox_id=sandbox_id))
        except grpc.RpcError as exc:
            raise to_connect_error(exc) from None
        processes = []
        for info in reply.processes:
            config = epb.ProcessConfig(cmd=info.argv[0] if info.argv else "", args=info.argv[1:], envs=info.env)
            if info.cwd:
                config.cwd = info.cwd
            entry = epb.ProcessInfo(config=config, pid=info.pid)
            if info.tag:
                entry.tag = info.tag
            processes.append(entry)
        return epb.ListResponse(processes=processes)

    async def update(self, request: epb.UpdateRequest, ctx: RequestContext) -> epb.UpdateResponse:
        sandbox_id, _ = self._stub()
        selector = _selector(sandbox_id, request.process)
        if request.HasField("pty"):
            size = ppb.PtySize(cols=request.pty.size.cols, rows=request.pty.size.rows)
            await self._unary("ResizePty", ppb.ResizePtyRequest(process=selector, size=size))
        return epb.UpdateResponse()

    async def send_input(self, request: epb.SendInputRequest, ctx: RequestContext) -> epb.SendInputResponse:
        sandbox_id, _ = self._stub()
        data = getattr(request.input, request.input.WhichOneof("input") or "stdin")
        await self._unary("SendInput", ppb.ProcessInput(process=_selector(sandbox_id, request.process), data=data))
        return epb.SendInputResponse()

    async def stream_input(
        self, requests: AsyncIterator[epb.StreamInputRequest], ctx: RequestContext
    ) -> epb.StreamInputResponse:
        """The first message names the process; data messages are sent in order, each acknowledged by dsec."""
        sandbox_id, _ = self._stub()
        selector: ppb.ProcessSelector | None = None
        async for message in requests:
            which = message.WhichOneof("event")
            if which == "start":
                selector = _selector(sandbox_id, message.start.process)
            elif which == "data":
                if selector is None:
                    raise ConnectError(Code.INVALID_ARGUMENT, "StreamInput must start with a start event (the process)")
                data = getattr(message.data.input, message.data.input.WhichOneof("input") or "stdin")
                await self._unary("SendInput", ppb.ProcessInput(process=selector, data=data))
        return epb.StreamInputResponse()

    async def send_signal(self, request: epb.SendSignalRequest, ctx: RequestContext) -> epb.SendSignalResponse:
        sandbox_id, _ = self._stub()
        if request.signal == epb.SIGNAL_UNSPECIFIED:
            raise ConnectError(Code.INVALID_ARGUMENT, "signal is unspecified (SIGTERM or SIGKILL)")
        selector = _selector(sandbox_id, request.process)
        await self._unary("SendSignal", ppb.SignalProcessRequest(process=selector, signal=int(request.signal)))
        return epb.SendSignalResponse()

    async def close_stdin(self, request: epb.CloseStdinRequest, ctx: RequestContext) -> epb.CloseStdinResponse:
        sandbox_id, _ = self._stub()
        await self._unary("CloseStdin", _selector(sandbox_id, request.process))
        return epb.CloseStdinResponse()


def grpc_code_is_missing_user(exc: grpc.RpcError) -> bool:
    try:
        return exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not exist" in (exc.details() or "")
    except Exception:  # noqa: BLE001
        return False


def _endpoints(svc: ProcessHandler) -> dict[str, object]:
    """The endpoint table of envd's generated `ProcessASGIApplication`, on google.protobuf messages."""
    table = [
        ("List", epb.ListRequest, epb.ListResponse, Endpoint.unary, svc.list),
        ("Connect", epb.ConnectRequest, epb.ConnectResponse, Endpoint.server_stream, svc.connect),
        ("Start", epb.StartRequest, epb.StartResponse, Endpoint.server_stream, svc.start),
        ("Update", epb.UpdateRequest, epb.UpdateResponse, Endpoint.unary, svc.update),
        ("StreamInput", epb.StreamInputRequest, epb.StreamInputResponse, Endpoint.client_stream, svc.stream_input),
        ("SendInput", epb.SendInputRequest, epb.SendInputResponse, Endpoint.unary, svc.send_input),
        ("SendSignal", epb.SendSignalRequest, epb.SendSignalResponse, Endpoint.unary, svc.send_signal),
        ("CloseStdin", epb.CloseStdinRequest, epb.CloseStdinResponse, Endpoint.unary, svc.close_stdin),
    ]
    return {
        f"/{SERVICE}/{name}": kind(
            method=MethodInfo(
                name=name, service_name=SERVICE, input=request, output=response,
                idempotency_level=IdempotencyLevel.UNKNOWN,
            ),  # fmt: skip
            function=function,
        )
        for name, request, response, kind, function in table
    }


class ProcessApp(ConnectASGIApplication[ProcessHandler]):
    def __init__(self, handler: ProcessHandler) -> None:
        super().__init__(service=handler, endpoints=_endpoints, codecs=envd_codecs())

    @property
    def path(self) -> str:
        return f"/{SERVICE}"


def make_app(ctx: CompatContext):
    return scoped(ProcessApp(ProcessHandler(ctx)))
