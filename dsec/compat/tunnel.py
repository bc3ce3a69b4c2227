"""`Tunnel`: one PortService.ForwardPort stream on the door's asyncio channel, used as an async byte stream.

Why a gRPC stream and not a socket: the door is a client of the dsec API (it may front a Ray cluster
gateway), so reaching a port inside a sandbox goes through the same authenticated API as everything else.
"""

from __future__ import annotations

import asyncio

import grpc

from dsec.compat.context import CompatContext, error_name, grpc_code, grpc_message
from dsec.v1 import ports_pb2 as ppb
from dsec.v1 import ports_pb2_grpc as ppb_grpc
from dsec.v1 import sandbox_pb2 as pb
from dsec.v1 import sandbox_pb2_grpc as pb_grpc

MAX_CHUNK = 1 << 20


class TunnelError(Exception):
    """The port could not be reached; `status` is the HTTP status the proxy answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# dsec error class → HTTP status of a reverse proxy: the upstream (the port) is what failed, hence 502
_STATUS_FOR_ERROR = {
    "PortUnreachable": 502,
    "SandboxNotFound": 502,  # E2B's proxy answers 502 for a sandbox it does not know, too
    "SandboxStateError": 502,
    "Unsupported": 501,
    "InvalidSpec": 400,
    "Unauthenticated": 401,
    "PermissionDenied": 403,
}


def _tunnel_error(exc: grpc.RpcError, sandbox_id: str, port: int) -> TunnelError:
    name = error_name(exc)
    status = _STATUS_FOR_ERROR.get(name)
    if status is None:
        code = grpc_code(exc)
        status = {grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403}.get(code, 502)
    return TunnelError(status, grpc_message(exc) or f"port {port} of sandbox {sandbox_id} is not reachable")


async def _failed_open(
    ctx: CompatContext, exc: Exception, sandbox_id: str, port: int, api_key: str | None
) -> TunnelError:
    """The error a failed open answers with. When the server ended the stream while the open message was still
    being written (it rejects a bad key before reading anything), gRPC's client replaces the server's status with
    "Internal error from Core", or the write finds the call already finished: the server's answer is lost. A
    unary `Get` of the sandbox with the same key then asks again, so an unknown key is a 401, not a 502."""
    if isinstance(exc, grpc.RpcError) and (error_name(exc) or grpc_code(exc) != grpc.StatusCode.INTERNAL):
        return _tunnel_error(exc, sandbox_id, port)
    try:
        await ctx.stub(pb_grpc.SandboxServiceStub, api_key).Get(pb.SandboxRef(sandbox_id=sandbox_id))
    except grpc.RpcError as probe_exc:
        return _tunnel_error(probe_exc, sandbox_id, port)
    if isinstance(exc, grpc.RpcError):
        return _tunnel_error(exc, sandbox_id, port)
    return TunnelError(502, f"port {port} of sandbox {sandbox_id}: the stream ended before it opened")


class Tunnel:
    """A connected byte stream to a port inside a sandbox. `read()` returns b"" once the sandbox side closed."""

    def __init__(self, call: grpc.aio.StreamStreamCall, sandbox_id: str, port: int) -> None:
        self._call = call
        self.sandbox_id = sandbox_id
        self.port = port
        self._write_closed = False
        self._eof = False

    @classmethod
    async def open(cls, ctx: CompatContext, sandbox_id: str, port: int, api_key: str | None) -> Tunnel:
        """Connect, or raise TunnelError (502 when nothing listens on the port)."""
        stub = ctx.stub(ppb_grpc.PortServiceStub, api_key)
        call = stub.ForwardPort(None)
        try:
            await call.write(ppb.PortChunk(open=ppb.PortOpen(sandbox_id=sandbox_id, port=port)))
            first = await call.read()
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            call.cancel()
            raise await _failed_open(ctx, exc, sandbox_id, port, api_key) from None
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "opened":
            call.cancel()
            raise TunnelError(502, f"port {port} of sandbox {sandbox_id}: the server did not confirm the connection")
        return cls(call, sandbox_id, port)

    async def write(self, data: bytes) -> None:
        if self._write_closed or not data:
            return
        view = memoryview(data)
        try:
            for start in range(0, len(view), MAX_CHUNK):
                await self._call.write(ppb.PortChunk(data=bytes(view[start : start + MAX_CHUNK])))
        except (grpc.RpcError, grpc.aio.UsageError):
            self._write_closed = True  # the stream ended: the reader sees the end

    async def close_write(self) -> None:
        if not self._write_closed:
            self._write_closed = True
            try:
                await self._call.done_writing()
            except (grpc.RpcError, grpc.aio.UsageError):
                pass

    async def read(self) -> bytes:
        """The next bytes from the sandbox side; b"" when it closed (or the stream broke)."""
        while not self._eof:
            try:
                message = await self._call.read()
            except grpc.RpcError:
                message = grpc.aio.EOF
            if message is grpc.aio.EOF:
                self._eof = True
                break
            kind = message.WhichOneof("kind")
            if kind == "data" and message.data:
                return message.data
            if kind == "close_write":
                self._eof = True
        return b""

    def close(self) -> None:
        """End the connection inside the sandbox (cancels the stream; idempotent)."""
        self._call.cancel()
