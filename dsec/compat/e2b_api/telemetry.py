"""E2B's metrics and logs routes on dsec's Metrics and Logs RPCs.

dsec samples a sandbox's usage when asked rather than storing a time series, so `GET /sandboxes/{id}/metrics`
answers one sample — now — when `now` is inside the requested [start, end] (none otherwise); its CPU % covers
the time since the previous sample. Logs are the sandbox's own event record (created, commands and their exit,
pause/resume, timeouts), oldest first.
"""

from __future__ import annotations


from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dsec.compat.e2b_api import wire
from dsec.compat.e2b_api.errors import ApiError
from dsec.compat.e2b_api.sandboxes import SandboxRoutes
from dsec.v1 import sandbox_pb2 as pb

MAX_LOGS = 1000
LEVELS = ("debug", "info", "warn", "error")


def _int_param(request: Request, name: str, default: int | None = None, low: int = 0, high: int = 2**53) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}")
    return value


class TelemetryRoutes:
    def __init__(self, routes: SandboxRoutes) -> None:
        self.routes = routes

    async def metrics(self, request: Request) -> Response:
        sandbox_id = request.path_params["sandbox_id"]
        start = _int_param(request, "start")
        end = _int_param(request, "end")
        await self.routes._get(request, sandbox_id)
        api = self.routes._api(request)
        sample = await self.routes._rpc(lambda: api.Metrics(pb.SandboxRef(sandbox_id=sandbox_id)), sandbox_id, request)
        if (start is not None and sample.sampled_at < start) or (end is not None and sample.sampled_at > end + 1):
            return JSONResponse([])
        return JSONResponse([{
            "timestamp": wire.iso(sample.sampled_at),
            "timestampUnix": int(sample.sampled_at),
            "cpuCount": sample.cpu_count,
            "cpuUsedPct": round(sample.cpu_used_pct, 2),
            "memUsed": sample.mem_used_bytes,
            "memTotal": sample.mem_total_bytes,
            "memCache": sample.mem_cache_bytes,
            "diskUsed": sample.disk_used_bytes,
            "diskTotal": sample.disk_total_bytes,
        }])  # fmt: skip

    async def _entries(self, request: Request, start_ms: int | None) -> list[pb.SandboxLogEntry]:
        sandbox_id = request.path_params["sandbox_id"]
        await self.routes._get(request, sandbox_id)
        api = self.routes._api(request)
        logs_request = pb.LogsRequest(sandbox_id=sandbox_id, start_at=(start_ms or 0) / 1000.0)
        reply = await self.routes._rpc(lambda: api.Logs(logs_request), sandbox_id, request)
        return list(reply.entries)

    async def logs_v1(self, request: Request) -> Response:
        """`SandboxLogs`: plain lines and structured entries; `start` is in milliseconds."""
        limit = _int_param(request, "limit", MAX_LOGS, 0, MAX_LOGS)
        entries = (await self._entries(request, _int_param(request, "start")))[:limit]
        return JSONResponse({
            "logs": [{"timestamp": wire.iso(e.logged_at), "line": _line(e)} for e in entries],
            "logEntries": [_entry(e) for e in entries],
        })  # fmt: skip

    async def logs_v2(self, request: Request) -> Response:
        """`SandboxLogsV2Response`: `cursor` (ms) and `direction` page through, `level` is a minimum, `search` a substring."""
        limit = _int_param(request, "limit", MAX_LOGS, 0, MAX_LOGS)
        cursor = _int_param(request, "cursor")
        direction = request.query_params.get("direction") or "forward"
        if direction not in ("forward", "backward"):
            raise ApiError(400, "direction must be forward or backward")
        level = request.query_params.get("level") or "debug"
        if level not in LEVELS:
            raise ApiError(400, f"level must be one of {', '.join(LEVELS)}")
        search = request.query_params.get("search") or ""
        entries = await self._entries(request, cursor if direction == "forward" else None)
        if direction == "backward":
            entries = [e for e in reversed(entries) if cursor is None or e.logged_at * 1000 <= cursor]
        entries = [e for e in entries if LEVELS.index(_level(e)) >= LEVELS.index(level) and search in _line(e)]
        return JSONResponse({"logs": [_entry(e) for e in entries[:limit]]})


def _level(entry: pb.SandboxLogEntry) -> str:
    return entry.level if entry.level in LEVELS else "info"


def _line(entry: pb.SandboxLogEntry) -> str:
    details = " ".join(f"{k}={v}" for k, v in sorted(entry.fields.items()))
    return f"{entry.message} {details}".strip()


def _entry(entry: pb.SandboxLogEntry) -> dict:
    return {"timestamp": wire.iso(entry.logged_at), "message": entry.message, "level": _level(entry), "fields": dict(entry.fields)}
