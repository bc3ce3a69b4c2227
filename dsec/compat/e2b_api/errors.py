"""E2B error responses: `{"code", "message"}` with the status the SDK maps to its exception classes.

404 → SandboxNotFoundException (sandbox routes) / NotFoundException; 401 → AuthenticationException;
429 → RateLimitException; 400 → InvalidArgumentException-like SandboxException; 409 → the SDK's
"already paused / not paused" answers. Never a 500 for the caller's mistake, never a traceback.
"""

from __future__ import annotations

import json

import grpc
from pydantic import ValidationError
from starlette.responses import JSONResponse

from dsec.compat.context import error_name, grpc_code, grpc_message, http_status_for
from dsec.errors import RETRY_AFTER_METADATA_KEY

MAX_BODY = 1 << 20


class ApiError(Exception):
    """An HTTP error answer; raised anywhere in a route, turned into E2B's error body by the app."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"code": self.status, "message": self.message}, self.status, headers=self.headers)


def from_grpc(exc: grpc.RpcError) -> ApiError:
    """A dsec gRPC error as the E2B status the SDK expects (Unsupported is the caller's request: 400)."""
    code = grpc_code(exc)
    status = 400 if code == grpc.StatusCode.UNIMPLEMENTED else http_status_for(exc)
    headers: dict[str, str] = {}
    if status == 429:
        for key, value in _trailing(exc):
            if key == RETRY_AFTER_METADATA_KEY:
                headers["Retry-After"] = str(max(1, round(float(value))))
    name = error_name(exc)
    message = grpc_message(exc) or code.name.lower()
    return ApiError(status, f"{name}: {message}" if name else message, headers)


def _trailing(exc: grpc.RpcError) -> list[tuple[str, str]]:
    try:
        return [(k, v if isinstance(v, str) else v.decode()) for k, v in exc.trailing_metadata() or ()]
    except Exception:  # noqa: BLE001 - channel errors carry none
        return []


def parse_json(raw: bytes) -> object:
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"request body over {MAX_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None


def from_validation(exc: ValidationError) -> ApiError:
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()[:5])
    return ApiError(400, f"invalid request body: {problems}")
