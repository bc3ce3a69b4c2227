"""WebSocket relay of the port proxy: an ASGI websocket ↔ a WebSocket client connection inside the sandbox.

Why message by message and not raw bytes: the ASGI server (uvicorn) has already done the client's handshake
and speaks messages, so the door runs its own WebSocket client (the `websockets` package's sans-I/O
protocol) over the PortService tunnel. The upstream handshake happens *before* the client is accepted, so
the client sees the upstream's subprotocol choice, and a port with no server behind it is refused (502)
instead of accepted and then dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidURI
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from dsec.compat.context import CompatContext
from dsec.compat.tunnel import Tunnel, TunnelError

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

MAX_MESSAGE = 64 << 20
# The upstream handshake writes these itself; per-hop headers never travel.
_HANDSHAKE_HEADERS = frozenset({
    "host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-protocol", "sec-websocket-accept", "keep-alive", "te", "trailer", "transfer-encoding",
    "proxy-authorization", "proxy-connection", "content-length", "e2b-sandbox-id", "e2b-sandbox-port",
})  # fmt: skip


async def _refuse(scope: dict, send: Send, status: int, message: str) -> None:
    """Refuse before accepting: an HTTP status where the server supports it, else close (uvicorn sends 403)."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = json.dumps({"code": status, "message": message}).encode()
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1011, "reason": message[:120]})


def _client_protocol(scope: dict, port: int) -> ClientProtocol:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
    path = scope.get("raw_path") or scope.get("path", "/").encode()
    query = scope.get("query_string") or b""
    resource = (path + (b"?" + query if query else b"")).decode("latin-1")
    try:
        uri = parse_uri(f"ws://{headers.get('host') or f'localhost:{port}'}{resource}")
    except InvalidURI:
        uri = parse_uri(f"ws://localhost:{port}{resource}")
    subprotocols = [Subprotocol(p) for p in scope.get("subprotocols") or ()]
    protocol = ClientProtocol(uri, subprotocols=subprotocols or None, max_size=MAX_MESSAGE)
    return protocol


async def _flush(protocol: ClientProtocol, tunnel: Tunnel) -> None:
    for data in protocol.data_to_send():
        if data:
            await tunnel.write(data)
        else:
            await tunnel.close_write()  # the protocol asks for EOF after a close handshake


async def _handshake(scope: dict, protocol: ClientProtocol, tunnel: Tunnel) -> tuple[Response | None, list]:
    """Send the upgrade request; returns the upstream's response (None if refused) and any frames that came with it."""
    request = protocol.connect()
    for key, value in scope.get("headers") or ():
        name = key.decode("latin-1").lower()
        if name not in _HANDSHAKE_HEADERS and name not in request.headers:
            request.headers[name] = value.decode("latin-1")
    protocol.send_request(request)
    await _flush(protocol, tunnel)
    while True:
        data = await tunnel.read()
        if data:
            protocol.receive_data(data)
        else:
            protocol.receive_eof()
        events = protocol.events_received()
        for index, event in enumerate(events):
            if isinstance(event, Response):
                return (event if protocol.state is State.OPEN else None), events[index + 1 :]
        if not data:
            return None, []


async def relay_websocket(
    ctx: CompatContext, scope: dict, receive: Receive, send: Send, sandbox_id: str, port: int, api_key: str | None
) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    try:
        tunnel = await Tunnel.open(ctx, sandbox_id, port, api_key)
    except TunnelError as exc:
        await _refuse(scope, send, exc.status, exc.message)
        return
    try:
        protocol = _client_protocol(scope, port)
        response, early_frames = await _handshake(scope, protocol, tunnel)
        if response is None:
            await _refuse(scope, send, 502, f"port {port} of sandbox {sandbox_id} refused the WebSocket handshake")
            return
        await send({"type": "websocket.accept", "subprotocol": protocol.subprotocol})
        # Frames that arrived together with the handshake response are already parsed: relay them first.
        upstream = asyncio.create_task(_upstream_to_client(protocol, tunnel, send, early_frames))
        try:
            await _client_to_upstream(protocol, tunnel, receive, upstream)
        finally:
            if not upstream.done():
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(upstream), timeout=5.0)  # the upstream's close reply
            upstream.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await upstream
    finally:
        tunnel.close()


async def _client_to_upstream(protocol: ClientProtocol, tunnel: Tunnel, receive: Receive, upstream: asyncio.Task) -> None:
    receiving = asyncio.ensure_future(receive())
    try:
        while True:
            done, _ = await asyncio.wait({receiving, upstream}, return_when=asyncio.FIRST_COMPLETED)
            if receiving not in done:
                return  # the upstream closed: the client was told, nothing more to forward
            message = receiving.result()
            if message["type"] == "websocket.receive":
                if protocol.state is not State.OPEN:
                    return
                if message.get("text") is not None:
                    protocol.send_text(message["text"].encode())
                else:
                    protocol.send_binary(message.get("bytes") or b"")
                await _flush(protocol, tunnel)
                receiving = asyncio.ensure_future(receive())
            elif message["type"] == "websocket.disconnect":
                if protocol.state is State.OPEN:
                    code = message.get("code", 1000)
                    protocol.send_close(code if 1000 <= code < 5000 and code not in (1005, 1006, 1015) else 1000)
                    await _flush(protocol, tunnel)
                return
    finally:
        if not receiving.done():
            receiving.cancel()


async def _upstream_to_client(protocol: ClientProtocol, tunnel: Tunnel, send: Send, pending: list) -> None:
    parts: list[bytes] = []
    text = False
    try:
        while True:
            for frame in pending:
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                    text, parts = frame.opcode is Opcode.TEXT, [frame.data]
                elif frame.opcode is Opcode.CONT:
                    parts.append(frame.data)
                elif frame.opcode is Opcode.CLOSE:
                    await _flush(protocol, tunnel)  # our close reply
                    code = protocol.close_code or 1000
                    await send({"type": "websocket.close", "code": 1000 if code in (1005, 1006) else code,
                                "reason": protocol.close_reason or ""})  # fmt: skip
                    return
                else:
                    continue  # ping/pong: the protocol answers pings itself (flushed below)
                if frame.fin and frame.opcode is not Opcode.CLOSE:
                    payload = b"".join(parts)
                    parts = []
                    if text:
                        await send({"type": "websocket.send", "text": payload.decode("utf-8", errors="replace")})
                    else:
                        await send({"type": "websocket.send", "bytes": payload})
            await _flush(protocol, tunnel)
            data = await tunnel.read()
            if not data:
                await send({"type": "websocket.close", "code": 1011, "reason": "the server in the sandbox went away"})
                return
            protocol.receive_data(data)
            pending = protocol.events_received()
    except (OSError, RuntimeError):
        with contextlib.suppress(Exception):
            await send({"type": "websocket.close", "code": 1011, "reason": "relay error"})
