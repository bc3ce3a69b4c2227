"""E2B control API (`E2B_API_URL`): the REST routes of the `e2b` SDK, served on dsec's gRPC API (docs/compat.md)."""

from __future__ import annotations

import grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dsec.compat.context import CompatContext
from dsec.compat.e2b_api.errors import ApiError, from_grpc
from dsec.compat.e2b_api.sandboxes import SandboxRoutes
from dsec.compat.e2b_api.telemetry import TelemetryRoutes


async def _health(_request: Request) -> Response:
    return Response(status_code=200)


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _grpc_error(_request: Request, exc: Exception) -> Response:
    """A backend error no route translated itself: still the status its gRPC code means, never a 500."""
    assert isinstance(exc, grpc.RpcError)
    return from_grpc(exc).response()


async def _internal_error(_request: Request, _exc: Exception) -> Response:
    """A JSON 500 without the traceback; Starlette re-raises the error, and the front door logs it."""
    return JSONResponse({"code": 500, "message": "internal error in dsec's E2B API; see the server log"}, 500)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"no E2B API route {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
    return JSONResponse({"code": exc.status_code, "message": message.get(exc.status_code, exc.detail)}, exc.status_code,
                        headers=getattr(exc, "headers", None))


def make_app(ctx: CompatContext) -> Starlette:
    r = SandboxRoutes(ctx)
    t = TelemetryRoutes(r)
    sid = "{sandbox_id:str}"
    routes = [
        Route("/health", _health, methods=["GET"]),
        Route("/sandboxes", r.create, methods=["POST"]),
        Route("/v2/sandboxes", r.create, methods=["POST"]),
        Route("/sandboxes", r.list_v1, methods=["GET"]),
        Route("/v2/sandboxes", r.list_v2, methods=["GET"]),
        Route(f"/sandboxes/{sid}", r.get, methods=["GET"]),
        Route(f"/sandboxes/{sid}", r.kill, methods=["DELETE"]),
        Route(f"/sandboxes/{sid}/timeout", r.set_timeout, methods=["POST"]),
        Route(f"/sandboxes/{sid}/refreshes", r.refresh, methods=["POST"]),
        Route(f"/sandboxes/{sid}/network", r.update_network, methods=["PUT"]),
        Route(f"/sandboxes/{sid}/pause", r.pause, methods=["POST"]),
        Route(f"/sandboxes/{sid}/resume", r.resume, methods=["POST"]),
        Route(f"/sandboxes/{sid}/connect", r.connect, methods=["POST"]),
        Route(f"/v2/sandboxes/{sid}/connect", r.connect, methods=["POST"]),
        Route(f"/sandboxes/{sid}/snapshots", r.create_snapshot, methods=["POST"]),
        Route("/snapshots", r.list_snapshots, methods=["GET"]),
        Route("/templates/{template_id:str}", r.delete_template, methods=["DELETE"]),
        Route(f"/sandboxes/{sid}/fork", r.fork, methods=["POST"]),
        Route(f"/sandboxes/{sid}/metrics", t.metrics, methods=["GET"]),
        Route(f"/sandboxes/{sid}/logs", t.logs_v1, methods=["GET"]),
        Route(f"/v2/sandboxes/{sid}/logs", t.logs_v2, methods=["GET"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, grpc.RpcError: _grpc_error, Exception: _internal_error}
    return Starlette(routes=routes, exception_handlers=handlers)
