"""The one HTTP entry point: sends each request to the E2B control API, envd, the port proxy or SandboxFusion.

E2B's SDK sends envd calls (and calls to any port of a sandbox) to `E2B_SANDBOX_URL` with the headers
`E2b-Sandbox-Id` / `E2b-Sandbox-Port`, and control calls to `E2B_API_URL`; routing on those headers lets
both variables name this one address. The dispatcher resolves the caller's API key (control: `X-API-Key`
or `Authorization: Bearer`; envd: `X-API-Key`, else the key the sandbox was created with) and checks the
envd access token of `secure` sandboxes, so sub-apps only ever see requests they may serve.
"""

from __future__ import annotations

import hmac
import importlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from dsec.compat.context import ENVD_TOKEN_LABEL, STATE_API_KEY, STATE_SANDBOX_ID, STATE_SANDBOX_PORT, CompatContext
from dsec.server.metrics import HTTP_REQUESTS, HTTP_SECONDS
from dsec.v1 import sandbox_pb2 as pb
from dsec.v1 import sandbox_pb2_grpc as pb_grpc

log = logging.getLogger("dsec.compat")

ENVD_PORT = 49983
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

# SandboxFusion's client posts to these paths on its endpoint (sandbox_fusion/client.py); `/v1/...` too.
FUSION_PATHS = frozenset({"/run_code", "/run_jupyter", "/get_prompts", "/get_prompt_by_id", "/submit"})
FUSION_PREFIX = "/v1/"

# Sub-app factories, imported on first use so a part that is not there yet answers 501 instead of breaking the door.
E2B_API = "dsec.compat.e2b_api"
ENVD = "dsec.compat.envd"
PORTS = "dsec.compat.ports"
FUSION = "dsec.compat.fusion"
API_NAMES = {E2B_API: "e2b", ENVD: "envd", PORTS: "ports", FUSION: "fusion"}  # the `api` label of door metrics
STATE_API = "dsec_api"

_SANDBOX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# E2B's `get_host(port)` is `<port>-<sandbox id>.<domain>`: with wildcard DNS for the domain pointing here, the
# Host header alone routes a request to that port of that sandbox (as E2B's own edge proxy does).
_SANDBOX_HOST = re.compile(r"^(?P<port>[0-9]{1,5})-(?P<id>[A-Za-z0-9][A-Za-z0-9_-]{0,127})\.")


async def send_json(send: Callable[[dict], Awaitable[None]], status: int, body: dict, headers: list | None = None) -> None:
    """A JSON response in E2B's error shape (`code`, `message`) that the SDK reads."""
    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                    *(headers or [])],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": payload})


async def error(send: Callable[[dict], Awaitable[None]], status: int, message: str) -> None:
    await send_json(send, status, {"code": status, "message": message})


def _headers(scope: dict) -> dict[str, str]:
    """Lower-cased request headers (the last value wins, like most frameworks)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}


def control_api_key(headers: dict[str, str]) -> str | None:
    """E2B's SDK sends `X-API-Key`; dsec's own convention is `Authorization: Bearer`."""
    key = headers.get("x-api-key")
    if key:
        return key
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return None


class FrontDoor:
    """ASGI app: route by header or path to lazily built sub-apps that share one `CompatContext`."""

    def __init__(self, ctx: CompatContext) -> None:
        self.ctx = ctx
        self._apps: dict[str, ASGIApp] = {}

    def _app(self, module: str) -> ASGIApp | None:
        app = self._apps.get(module)
        if app is None:
            try:
                factory = importlib.import_module(module).make_app
            except ModuleNotFoundError as exc:
                if exc.name and module.startswith(exc.name):
                    return None  # that part of the door is not built yet
                raise
            app = self._apps[module] = factory(self.ctx)
        return app

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] not in ("http", "websocket"):
            return
        started, status = time.monotonic(), [0]

        async def observed(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "websocket.accept":
                status[0] = 101
            await send(message)

        try:
            await self._dispatch(scope, receive, observed)
        except Exception:  # noqa: BLE001 - never a traceback on the wire; the log has it
            log.exception("compat: unhandled error on %s %s", scope.get("method", "WS"), scope.get("path"))
            if scope["type"] == "http":
                try:
                    await error(send, 500, "internal error in the dsec front door; see the server log")
                except Exception:  # noqa: BLE001 - the response had already started
                    pass
                status[0] = status[0] or 500
        finally:
            api = scope.get("state", {}).get(STATE_API, "door")
            HTTP_REQUESTS.labels(api, f"{status[0] // 100}xx" if status[0] else "none").inc()
            HTTP_SECONDS.labels(api).observe(time.monotonic() - started)

    async def _lifespan(self, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.ctx.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _dispatch(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        headers = _headers(scope)
        state: dict[str, Any] = scope.setdefault("state", {})
        sandbox_id = headers.get("e2b-sandbox-id")
        port_text = headers.get("e2b-sandbox-port", str(ENVD_PORT))
        if sandbox_id is None and (by_host := _SANDBOX_HOST.match(headers.get("host", ""))):
            port_text, sandbox_id = by_host.group("port"), by_host.group("id")  # `sandbox.get_host(port)`
        if sandbox_id is not None:
            if not _SANDBOX_ID.match(sandbox_id):
                await self._reject(scope, send, 400, "E2b-Sandbox-Id is not a sandbox id")
                return
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                await self._reject(scope, send, 400, "E2b-Sandbox-Port must be a TCP port number")
                return
            port = int(port_text)
            if not self.ctx.knows(sandbox_id):
                await self._learn(sandbox_id, headers.get("x-api-key"))
            expected = self.ctx.envd_token_for(sandbox_id)
            if expected is not None and port == ENVD_PORT:
                given = headers.get("x-access-token", "")
                if not hmac.compare_digest(given.encode(), expected.encode()):
                    await self._reject(scope, send, 401, f"sandbox {sandbox_id} is secure: send its envd access token in X-Access-Token")
                    return
            state[STATE_SANDBOX_ID] = sandbox_id
            state[STATE_SANDBOX_PORT] = port
            state[STATE_API_KEY] = headers.get("x-api-key") or self.ctx.key_for(sandbox_id)
            module = ENVD if port == ENVD_PORT else PORTS
        else:
            state[STATE_API_KEY] = control_api_key(headers)
            path = scope.get("path", "")
            module = FUSION if path in FUSION_PATHS or path.startswith(FUSION_PREFIX) else E2B_API
        state[STATE_API] = API_NAMES[module]
        app = self._app(module)
        if app is None:
            await self._reject(scope, send, 501, f"{module} is not available in this dsec build")
            return
        await app(scope, receive, send)

    async def _learn(self, sandbox_id: str, api_key: str | None) -> None:
        """A sandbox this door did not create (or created before a restart): its envd token is in its labels, and a
        request without a key (envd's and ports' never have one) acts as its owner when the door created it
        (`CompatContext.owner_key`). A lookup that fails leaves it unknown; the sub-app then answers the backend's
        error itself."""
        api_key = api_key or self.ctx.owner_key(sandbox_id)
        try:
            info = await self.ctx.stub(pb_grpc.SandboxServiceStub, api_key).Get(pb.SandboxRef(sandbox_id=sandbox_id))
        except grpc.RpcError:
            return
        self.ctx.remember_sandbox(sandbox_id, api_key, info.spec.labels.get(ENVD_TOKEN_LABEL) or None)

    async def _reject(self, scope: dict, send: Callable[[dict], Awaitable[None]], status: int, message: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            return
        await error(send, status, message)


def make_app(ctx: CompatContext) -> FrontDoor:
    return FrontDoor(ctx)
