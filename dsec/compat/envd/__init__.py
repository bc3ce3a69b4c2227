"""E2B's envd (the in-sandbox daemon's API) on the front door: Connect RPC `process.Process` and
`filesystem.Filesystem`, plus envd's plain HTTP routes (`/files`, `/health`).

The front door sends here every request whose `E2b-Sandbox-Port` is envd's (49983) or absent; the sandbox id
and the caller's key are in `scope["state"]`. Each part is its own ASGI app, imported on first use so a part
that is not built answers 501 instead of breaking the others.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Awaitable, Callable

from dsec.compat.context import CompatContext

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

PROCESS_PREFIX = "/process.Process/"
FILESYSTEM_PREFIX = "/filesystem.Filesystem/"
PARTS = {
    "process": "dsec.compat.envd.process",
    "filesystem": "dsec.compat.envd.filesystem",
    "http": "dsec.compat.envd.files_http",
}


class EnvdApp:
    def __init__(self, ctx: CompatContext) -> None:
        self.ctx = ctx
        self._apps: dict[str, ASGIApp | None] = {}

    def _app(self, part: str) -> ASGIApp | None:
        if part not in self._apps:
            module = PARTS[part]
            try:
                factory = importlib.import_module(module).make_app
            except ModuleNotFoundError as exc:
                if not (exc.name and module.startswith(exc.name)):
                    raise
                factory = None  # that part of envd is not built
            self._apps[part] = factory(self.ctx) if factory is not None else None
        return self._apps[part]

    async def __call__(
        self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]
    ) -> None:
        path = scope.get("path", "")
        part = "http"
        if path.startswith(PROCESS_PREFIX):
            part = "process"
        elif path.startswith(FILESYSTEM_PREFIX):
            part = "filesystem"
        app = self._app(part)
        if app is None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1011, "reason": "not available"})
                return
            body = json.dumps({"code": 501, "message": f"envd {part} API is not available in this dsec build"}).encode()
            await send({
                "type": "http.response.start", "status": 501,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            })  # fmt: skip
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)


def make_app(ctx: CompatContext) -> EnvdApp:
    return EnvdApp(ctx)
