"""The port proxy: a request for a sandbox port other than envd's goes to that port inside the sandbox.

This is what `sandbox.get_host(port)` of the E2B SDK reaches, and what `e2b-code-interpreter` calls (its
kernel server on port 49999). The dispatcher (front_door.py) has resolved the sandbox id, port and the
caller's key into `scope["state"]`; each HTTP request or WebSocket becomes one PortService.ForwardPort stream
(tunnel.py). HTTP is re-spoken with h11 over that stream (one upstream connection per request, so a client
that disconnects ends the request inside the sandbox too); WebSockets are relayed message by message
(port_websocket.py). Bodies stream in both directions: nothing is buffered whole.

Errors: nothing listening on the port → 502 (as E2B's proxy), a sandbox the caller cannot see → 502, a VM
whose image has no python3 → 501; the body is E2B's JSON error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import h11

from dsec.compat.context import STATE_API_KEY, STATE_SANDBOX_ID, STATE_SANDBOX_PORT, CompatContext
from dsec.compat.front_door import error
from dsec.compat.port_websocket import relay_websocket
from dsec.compat.tunnel import Tunnel, TunnelError

log = logging.getLogger("dsec.compat.ports")

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

# Per-hop headers (RFC 9110 §7.6.1; `Expect: 100-continue` was answered by the door's HTTP server) and the door's
# own routing headers never go upstream.
_REQUEST_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length", b"expect", b"e2b-sandbox-id", b"e2b-sandbox-port",
})  # fmt: skip
_RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"trailer", b"transfer-encoding", b"upgrade"})


def upstream_headers(scope: dict, port: int) -> list[tuple[bytes, bytes]]:
    """The client's headers minus per-hop and routing ones; Host names the sandbox's port when absent."""
    headers = [(k.lower(), v) for k, v in scope.get("headers") or () if k.lower() not in _REQUEST_DROP]
    if not any(k == b"host" for k, _ in headers):
        headers.insert(0, (b"host", f"localhost:{port}".encode()))
    return headers


def _target(scope: dict) -> bytes:
    path = scope.get("raw_path") or scope.get("path", "/").encode()
    query = scope.get("query_string") or b""
    return path + (b"?" + query if query else b"")


class PortProxy:
    """ASGI app of the port proxy (HTTP and WebSocket scopes)."""

    def __init__(self, ctx: CompatContext) -> None:
        self.ctx = ctx

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        state = scope.get("state") or {}
        sandbox_id, port, api_key = state.get(STATE_SANDBOX_ID), state.get(STATE_SANDBOX_PORT), state.get(STATE_API_KEY)
        if not sandbox_id or not port:
            if scope["type"] == "http":
                await error(send, 400, "send E2b-Sandbox-Id and E2b-Sandbox-Port to reach a sandbox port")
            return
        if scope["type"] == "websocket":
            await relay_websocket(self.ctx, scope, receive, send, sandbox_id, port, api_key)
        elif scope["type"] == "http":
            await self._http(scope, receive, send, sandbox_id, port, api_key)

    async def _http(self, scope: dict, receive: Receive, send: Send, sandbox_id: str, port: int, api_key: str | None) -> None:
        # Read the first body chunk before connecting: a complete body gets a Content-Length upstream.
        first = await receive()
        if first["type"] == "http.disconnect":
            return
        try:
            tunnel = await Tunnel.open(self.ctx, sandbox_id, port, api_key)
        except TunnelError as exc:
            await error(send, exc.status, exc.message)
            return
        try:
            await _exchange(scope, first, receive, send, tunnel)
        finally:
            tunnel.close()


async def _exchange(scope: dict, first: dict, receive: Receive, send: Send, tunnel: Tunnel) -> None:
    """One request/response over the tunnel; the request body is pumped while the response is read."""
    conn = h11.Connection(our_role=h11.CLIENT)
    headers = upstream_headers(scope, tunnel.port)
    body, more = first.get("body", b""), first.get("more_body", False)
    if more:
        headers.append((b"transfer-encoding", b"chunked"))
    elif body or scope["method"] not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        headers.append((b"content-length", str(len(body)).encode()))
    headers.append((b"connection", b"close"))
    try:
        request = h11.Request(method=scope["method"], target=_target(scope), headers=headers)
    except h11.LocalProtocolError as exc:
        await error(send, 400, f"request cannot be forwarded: {exc}")
        return
    await tunnel.write(conn.send(request))

    async def pump_body() -> None:
        chunk, more_body = body, more
        while True:
            if chunk:
                await tunnel.write(conn.send(h11.Data(data=chunk)))
            if not more_body:
                break
            message = await receive()
            if message["type"] == "http.disconnect":
                tunnel.close()
                return
            chunk, more_body = message.get("body", b""), message.get("more_body", False)
        await tunnel.write(conn.send(h11.EndOfMessage()))
        # The request is complete: watch for the client going away so the upstream request ends with it.
        while (await receive())["type"] != "http.disconnect":
            pass
        tunnel.close()

    pump = asyncio.create_task(pump_body())
    relay = _ResponseRelay(conn, tunnel, send)
    try:
        await relay.run()
    except h11.RemoteProtocolError as exc:
        if not relay.started:
            await error(send, 502, f"port {tunnel.port} of sandbox {tunnel.sandbox_id} answered invalid HTTP: {exc}")
        else:
            # Cut short mid-body (the server or the sandbox went away): leave the response incomplete, so the
            # HTTP server drops the connection and the client sees a truncated body, not a complete-looking one.
            log.info("sandbox %s port %d: response cut short: %s", tunnel.sandbox_id, tunnel.port, exc)
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump


class _ResponseRelay:
    """The upstream response as ASGI messages; `started` says whether the client's response has begun."""

    def __init__(self, conn: h11.Connection, tunnel: Tunnel, send: Send) -> None:
        self.conn, self.tunnel, self.send = conn, tunnel, send
        self.started = False

    async def run(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.tunnel.read())  # b"" = the sandbox side closed
            elif isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and friends are per-hop
            elif isinstance(event, h11.Response):
                headers = [(k, v) for k, v in event.headers if k.lower() not in _RESPONSE_DROP]
                await self.send({"type": "http.response.start", "status": event.status_code, "headers": headers})
                self.started = True
            elif isinstance(event, h11.Data):
                await self.send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
            elif isinstance(event, h11.EndOfMessage):
                await self.send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("the server closed the connection without a response")


def make_app(ctx: CompatContext) -> PortProxy:
    return PortProxy(ctx)
