"""What the envd Connect services share: who is calling (sandbox, key, user), error mapping, keepalives.

Connect handlers only see the request and its headers, not the ASGI scope the front door annotated; `scoped`
wraps a Connect app so the scope's state (sandbox id, API key) is in a context variable for the handlers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from connectrpc.code import Code
from connectrpc.codec import Codec
from connectrpc.compat import google_protobuf_codecs
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from dsec.compat.context import STATE_API_KEY, STATE_SANDBOX_ID, error_name, grpc_code, grpc_message

T = TypeVar("T")
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

_STATE: contextvars.ContextVar[dict] = contextvars.ContextVar("dsec_envd_state")

KEEPALIVE_HEADER = "keepalive-ping-interval"
MAX_KEEPALIVE_S = 50.0
QUEUED_ITEMS = 64  # stream items read ahead of a slow client (gRPC flow control then holds the rest)

_CODES: dict[grpc.StatusCode, Code] = {
    grpc.StatusCode.CANCELLED: Code.CANCELED,
    grpc.StatusCode.INVALID_ARGUMENT: Code.INVALID_ARGUMENT,
    grpc.StatusCode.DEADLINE_EXCEEDED: Code.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND: Code.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: Code.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED: Code.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Code.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION: Code.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED: Code.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE: Code.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED: Code.UNIMPLEMENTED,
    grpc.StatusCode.UNAVAILABLE: Code.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: Code.UNAUTHENTICATED,
}


@dataclass(frozen=True)
class Caller:
    sandbox_id: str
    api_key: str | None


def scoped(app: ASGIApp) -> ASGIApp:
    async def wrapped(
        scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]
    ) -> None:
        token = _STATE.set(scope.get("state") or {})
        try:
            await app(scope, receive, send)
        finally:
            _STATE.reset(token)

    return wrapped


def caller() -> Caller:
    state = _STATE.get({})
    sandbox_id = state.get(STATE_SANDBOX_ID)
    if not sandbox_id:
        raise ConnectError(Code.INVALID_ARGUMENT, "no sandbox named: send the E2b-Sandbox-Id header")
    return Caller(sandbox_id, state.get(STATE_API_KEY))


def envd_user(ctx: RequestContext) -> str | None:
    """The user of E2B's `Authorization: Basic base64("<user>:")` header, or None when the SDK sent none."""
    header = ctx.request_headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ConnectError(Code.INVALID_ARGUMENT, "malformed Basic authorization header (base64 of 'user:')") from None
    return decoded.split(":", 1)[0] or None


def to_connect_error(exc: grpc.RpcError) -> ConnectError:
    """The Connect error an envd client expects for a dsec gRPC error (codes map one to one)."""
    code = _CODES.get(grpc_code(exc), Code.UNKNOWN)
    name = error_name(exc)
    if name in ("SandboxNotFound", "SandboxExpired") or (name == "SandboxStateError" and "destroyed" in grpc_message(exc)):
        code = Code.NOT_FOUND
    return ConnectError(code, grpc_message(exc) or code.value)


class _StrictCodec(Codec):
    """google.protobuf's codec, with an undecodable request answered INVALID_ARGUMENT (HTTP 400): the
    library would call it UNKNOWN (500), and bad input is the caller's error, not the server's."""

    def __init__(self, inner: Codec) -> None:
        self._inner = inner

    def name(self) -> str:
        return self._inner.name()

    def encode(self, message):  # type: ignore[no-untyped-def]
        return self._inner.encode(message)

    def decode(self, data, message_class):  # type: ignore[no-untyped-def]
        try:
            return self._inner.decode(data, message_class)
        except Exception as exc:  # noqa: BLE001 - any decode failure is a malformed request
            what = message_class.DESCRIPTOR.full_name
            raise ConnectError(Code.INVALID_ARGUMENT, f"malformed {what}: {exc}") from None


def envd_codecs() -> list[Codec]:
    return [_StrictCodec(codec) for codec in google_protobuf_codecs()]


def keepalive_interval(ctx: RequestContext) -> float:
    raw = ctx.request_headers.get(KEEPALIVE_HEADER, "")
    try:
        value = float(raw)
    except ValueError:
        return MAX_KEEPALIVE_S
    return min(max(value, 1.0), MAX_KEEPALIVE_S)



async def with_idle_ticks(stream: AsyncIterator[T], interval_s: float) -> AsyncIterator[T | None]:
    """Yield the stream's items, and None whenever `interval_s` passes without one (a keepalive is due).

    A reader task drains the stream into a queue, so waiting with a timeout never cancels the gRPC read.
    """
    queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUED_ITEMS)  # bounded: a slow client slows the reads
    done = object()

    async def pump() -> None:
        try:
            async for item in stream:
                await queue.put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put(exc)
            return
        await queue.put(done)

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), interval_s)
            except asyncio.TimeoutError:
                yield None
                continue
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        task.cancel()
