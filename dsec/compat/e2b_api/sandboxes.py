"""The E2B control routes the `e2b` SDK calls (e2b/api/client/api/sandboxes, snapshots, templates), each a few
gRPC calls on dsec's SandboxService as the caller's tenant. Status codes follow the SDK's generated client:
201 on create/connect-resume/snapshot/fork, 204 on kill/timeout/pause, 404 for an unknown or gone sandbox, 409
for pausing a paused sandbox or resuming a running one.
"""

from __future__ import annotations

import re
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dsec.compat.context import STATE_API_KEY, CompatContext, error_name
from dsec.compat.e2b_api import wire
from dsec.compat.e2b_api.errors import ApiError, from_grpc, from_validation, parse_json
from dsec.compat.template_start import StartFailed, run_start_command
from dsec.substrates import registry
from dsec.v1 import sandbox_pb2 as pb
from dsec.v1 import sandbox_pb2_grpc as pb_grpc

M = TypeVar("M", bound=BaseModel)

# E2B template names → dsec image tags; any other template is used as a dsec image reference as it is.
TEMPLATE_IMAGES = {"base": "base", "code-interpreter-v1": "code-interpreter", "code-interpreter": "code-interpreter"}
ALL_TRAFFIC = "0.0.0.0/0"
GONE_STATES = ("destroyed", "lost")
SNAPSHOT_ID = re.compile(r"^snap-[0-9a-f]{16}$")  # dsec/server/snapshots.py


class SandboxRoutes:
    """Route handlers bound to one `CompatContext`."""

    def __init__(self, ctx: CompatContext) -> None:
        self.ctx = ctx

    # -- plumbing -------------------------------------------------------------------------------------
    def _api(self, request: Request) -> Any:
        return self.ctx.stub(pb_grpc.SandboxServiceStub, _key(request))

    async def _rpc(self, call: Callable[[], Awaitable[Any]], sandbox_id: str = "", request: Request | None = None) -> Any:
        """Run one RPC; a sandbox that no longer exists (dsec: destroyed → FAILED_PRECONDITION) is E2B's 404."""
        try:
            return await call()
        except grpc.RpcError as exc:
            error = from_grpc(exc)
            if sandbox_id and (error.status == 404 or (error_name(exc) == "SandboxStateError" and await self._gone(request, sandbox_id))):
                raise ApiError(404, f"sandbox {sandbox_id} not found") from None
            raise error from None

    async def _gone(self, request: Request | None, sandbox_id: str) -> bool:
        if request is None:
            return False
        try:
            info = await self._api(request).Get(pb.SandboxRef(sandbox_id=sandbox_id))
        except grpc.RpcError:
            return True
        return info.state in GONE_STATES

    async def _get(self, request: Request, sandbox_id: str) -> pb.SandboxInfo:
        info = await self._rpc(lambda: self._api(request).Get(pb.SandboxRef(sandbox_id=sandbox_id)), sandbox_id, request)
        if info.state in GONE_STATES:
            raise ApiError(404, f"sandbox {sandbox_id} not found")
        return info

    # -- create -----------------------------------------------------------------------------------------
    async def create(self, request: Request) -> Response:
        body = await read_model(request, wire.NewSandboxBody)
        metadata = dict(body.metadata or {})
        bad = [k for k in metadata if k.startswith(wire.LABEL_PREFIX)]
        if bad:
            raise ApiError(400, f"metadata keys starting with {wire.LABEL_PREFIX!r} are reserved by dsec: {bad}")
        auto_resume = isinstance(body.autoResume, dict) and bool(body.autoResume.get("enabled"))
        for name in ("volumeMounts", "mcp", "iam"):
            if getattr(body, name):
                raise ApiError(400, f"{name} is not supported by dsec (docs/compat.md)")
        substrate = metadata.get(wire.SUBSTRATE_METADATA_KEY, "container")
        if substrate not in registry.names():
            raise ApiError(400, f"metadata {wire.SUBSTRATE_METADATA_KEY}={substrate!r}: expected one of "
                                f"{', '.join(registry.names())}")
        internet, network_allow = _network(body)
        token = secrets.token_urlsafe(24)
        labels = metadata | {wire.LABEL_TEMPLATE: body.templateID, wire.LABEL_ENVD_TOKEN: token,
                             wire.LABEL_INTERNET: "1" if internet else "0"}
        timeout_s = float(body.timeout or wire.DEFAULT_TIMEOUT_S)
        api = self._api(request)
        on_timeout = "pause" if body.autoPause else "destroy"
        if SNAPSHOT_ID.match(body.templateID) and body.autoPause:
            raise ApiError(400, "autoPause with a snapshot as the template is not supported: the sandbox keeps the "
                                "snapshot's timeout behaviour (docs/compat.md)")
        if SNAPSHOT_ID.match(body.templateID):
            info = await self._restore(api, body.templateID, labels, timeout_s)
        else:
            spec = pb.SandboxSpec(
                image=TEMPLATE_IMAGES.get(body.templateID, body.templateID), substrate=substrate, timeout_s=timeout_s,
                env=body.envVars or {}, labels=labels, network=False, network_allow=network_allow, on_timeout=on_timeout,
                auto_resume=auto_resume,
            )
            try:
                info = await api.Create(pb.CreateRequest(spec=spec))
            except grpc.RpcError as exc:
                if error_name(exc) != "ImageNotFound":
                    raise from_grpc(exc) from None
                snapshot_id = await self._snapshot_named(api, body.templateID)
                if snapshot_id is None:
                    raise ApiError(404, f"template {body.templateID!r} not found: no dsec image or snapshot by that name "
                                        "(dsec images ls)") from None
                if body.autoPause:
                    raise ApiError(400, "autoPause with a snapshot as the template is not supported: the sandbox keeps "
                                        "the snapshot's timeout behaviour (docs/compat.md)") from None
                info = await self._restore(api, snapshot_id, labels, timeout_s)
        try:
            await run_start_command(self.ctx, _key(request), info)  # a template's service (code interpreter)
        except StartFailed as exc:
            raise ApiError(502, str(exc), {"Should-Retry": "false"}) from None  # retrying would fail the same way
        self.ctx.remember_sandbox(info.id, _key(request), info.spec.labels.get(wire.LABEL_ENVD_TOKEN))
        return JSONResponse(wire.created(info), 201)

    async def _restore(self, api: Any, snapshot_id: str, labels: dict[str, str], timeout_s: float) -> pb.SandboxInfo:
        try:
            return await api.Restore(pb.RestoreRequest(snapshot_id=snapshot_id, labels=labels, timeout_s=timeout_s))
        except grpc.RpcError as exc:
            error = from_grpc(exc)
            if error.status == 404:
                raise ApiError(404, f"template (snapshot) {snapshot_id!r} not found") from None
            raise error from None

    async def _snapshot_named(self, api: Any, name: str) -> str | None:
        try:
            found = await api.ListSnapshots(pb.ListSnapshotsRequest())
        except grpc.RpcError as exc:
            raise from_grpc(exc) from None
        named = sorted((s for s in found.snapshots if s.name == name), key=lambda s: s.created_at)
        return named[-1].snapshot_id if named else None

    # -- read -------------------------------------------------------------------------------------------
    async def get(self, request: Request) -> Response:
        return JSONResponse(wire.detail(await self._get(request, _path_id(request))))

    async def list_v2(self, request: Request) -> Response:
        query = request.query_params
        states = _states(query.get("state"))
        if query.get("startedAfter"):
            _timestamp(query["startedAfter"])  # a bad time is 400 even when nothing would be filtered
        infos = await self._list(request, _metadata_filter(query.get("metadata")))
        infos = [i for i in infos if i.state not in GONE_STATES and wire.state_of(i) in states]
        template = query.get("template")
        if template:
            infos = [i for i in infos if template in (wire.template_of(i), i.spec.image)]
        started_after = query.get("startedAfter")
        if started_after:
            since = _timestamp(started_after)
            infos = [i for i in infos if i.created_at >= since]
        page, next_token = _paginate(infos, lambda i: (i.created_at, i.id), query)
        headers = {"x-next-token": next_token} if next_token else {}
        return JSONResponse([wire.listed(i) for i in page], headers=headers)

    async def list_v1(self, request: Request) -> Response:
        infos = await self._list(request, _metadata_filter(request.query_params.get("metadata")))
        return JSONResponse([wire.listed(i) for i in infos if i.state not in GONE_STATES])

    async def _list(self, request: Request, labels: dict[str, str]) -> list[pb.SandboxInfo]:
        reply = await self._rpc(lambda: self._api(request).List(pb.ListRequest(labels=labels)))
        return list(reply.sandboxes)

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def kill(self, request: Request) -> Response:
        sandbox_id = _path_id(request)
        await self._get(request, sandbox_id)
        await self._rpc(lambda: self._api(request).Destroy(pb.SandboxRef(sandbox_id=sandbox_id)), sandbox_id, request)
        self.ctx.forget_sandbox(sandbox_id)
        return Response(status_code=204)

    async def set_timeout(self, request: Request) -> Response:
        sandbox_id = _path_id(request)
        body = await read_model(request, wire.TimeoutBody)
        await self._set_timeout(request, sandbox_id, body.timeout)
        return Response(status_code=204)

    async def _set_timeout(self, request: Request, sandbox_id: str, timeout: int) -> pb.SandboxInfo:
        # E2B: a timeout of 0 ends the sandbox now; dsec reads 0 as "server default", so ask for the smallest TTL.
        timeout_s = float(timeout) if timeout > 0 else 0.001
        request_pb = pb.SetTimeoutRequest(sandbox_id=sandbox_id, timeout_s=timeout_s)
        return await self._rpc(lambda: self._api(request).SetTimeout(request_pb), sandbox_id, request)

    async def refresh(self, request: Request) -> Response:
        """Deprecated keep-alive: the sandbox lives `duration` seconds (default E2B's 15) from now."""
        sandbox_id = _path_id(request)
        body = await read_model(request, wire.RefreshBody)
        await self._set_timeout(request, sandbox_id, body.duration or wire.DEFAULT_TIMEOUT_S)
        return Response(status_code=204)

    async def update_network(self, request: Request) -> Response:
        """`Sandbox.update_network`: dsec sets a sandbox's network (netns, allowlist filter) once, at create."""
        sandbox_id = _path_id(request)
        await read_model(request, wire.NetworkBody)
        await self._get(request, sandbox_id)
        raise ApiError(400, "changing the network of a running sandbox is not supported by dsec: create it with the "
                            "allow_internet_access / network.allowOut it needs (docs/compat.md)")

    async def pause(self, request: Request) -> Response:
        """E2B's pause keeps memory by default (`mode="full"`): a memory pause where the substrate and host can,
        else a freeze (memory kept in RAM); `mode="filesystem"` (memory false) keeps files only."""
        sandbox_id = _path_id(request)
        body = await read_model(request, wire.PauseBody)
        info = await self._get(request, sandbox_id)
        if info.state == "paused":
            raise ApiError(409, f"sandbox {sandbox_id} is already paused")
        api = self._api(request)

        async def pause() -> pb.SandboxInfo:
            if body.memory is False:
                return await api.Pause(pb.PauseRequest(sandbox_id=sandbox_id, kind="files"))
            try:
                return await api.Pause(pb.PauseRequest(sandbox_id=sandbox_id, kind="memory"))
            except grpc.RpcError as exc:
                if error_name(exc) != "Unsupported":
                    raise
            return await api.Pause(pb.PauseRequest(sandbox_id=sandbox_id, kind="freeze"))

        await self._rpc(pause, sandbox_id, request)
        return Response(status_code=204)

    async def resume(self, request: Request) -> Response:
        """Deprecated `POST /sandboxes/{id}/resume`: 409 unless paused."""
        sandbox_id = _path_id(request)
        body = await read_model(request, wire.ResumeBody)
        if body.autoPause:
            raise ApiError(400, "autoPause is not supported by dsec (docs/compat.md)")
        info = await self._get(request, sandbox_id)
        if info.state != "paused":
            raise ApiError(409, f"sandbox {sandbox_id} is not paused")
        info = await self._rpc(lambda: self._api(request).Resume(pb.SandboxRef(sandbox_id=sandbox_id)), sandbox_id, request)
        if body.timeout:
            info = await self._set_timeout(request, sandbox_id, body.timeout)
        self.ctx.remember_sandbox(sandbox_id, _key(request))
        return JSONResponse(wire.created(info), 201)

    async def connect(self, request: Request) -> Response:
        """Connect: resume a paused sandbox (201) or return a running one (200); a longer timeout extends it."""
        sandbox_id = _path_id(request)
        body = await read_model(request, wire.ConnectBody)
        info = await self._get(request, sandbox_id)
        status = 200
        if info.state == "paused":
            info = await self._rpc(lambda: self._api(request).Resume(pb.SandboxRef(sandbox_id=sandbox_id)), sandbox_id, request)
            status = 201
        if body.timeout and info.expires_at < time.time() + body.timeout:
            info = await self._set_timeout(request, sandbox_id, body.timeout)
        self.ctx.remember_sandbox(sandbox_id, _key(request), info.spec.labels.get(wire.LABEL_ENVD_TOKEN))
        return JSONResponse(wire.created(info), status)

    # -- snapshots and fork -----------------------------------------------------------------------------
    async def create_snapshot(self, request: Request) -> Response:
        sandbox_id = _path_id(request)
        body = await read_model(request, wire.SnapshotBody)
        await self._get(request, sandbox_id)
        ref = await self._rpc(lambda: self._api(request).Snapshot(pb.SnapshotRequest(sandbox_id=sandbox_id, name=body.name or "")),
                              sandbox_id, request)
        return JSONResponse(wire.snapshot_info(ref), 201)

    async def list_snapshots(self, request: Request) -> Response:
        query = request.query_params
        sandbox_id = query.get("sandboxID", "")
        reply = await self._rpc(lambda: self._api(request).ListSnapshots(pb.ListSnapshotsRequest(sandbox_id=sandbox_id)))
        snapshots = list(reply.snapshots)
        name = query.get("name")
        if name:
            snapshots = [s for s in snapshots if s.name == name]
        page, next_token = _paginate(snapshots, lambda s: (s.created_at, s.snapshot_id), query)
        headers = {"x-next-token": next_token} if next_token else {}
        return JSONResponse([wire.snapshot_info(s) for s in page], headers=headers)

    async def delete_template(self, request: Request) -> Response:
        """`Sandbox.delete_snapshot` deletes the snapshot's template; dsec templates that are images are not deleted here."""
        template_id = request.path_params["template_id"]
        if not SNAPSHOT_ID.match(template_id):
            raise ApiError(404, f"no snapshot {template_id!r} (images are removed with `dsec images rm`)")
        await self._rpc(lambda: self._api(request).DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=template_id)))
        return Response(status_code=204)

    async def fork(self, request: Request) -> Response:
        sandbox_id = _path_id(request)
        body = await read_model(request, wire.ForkBody)
        await self._get(request, sandbox_id)
        reply = await self._rpc(lambda: self._api(request).Fork(pb.ForkRequest(sandbox_id=sandbox_id, n=body.count or 1)),
                                sandbox_id, request)
        results = []
        for info in reply.sandboxes:
            if body.timeout:
                info = await self._set_timeout(request, info.id, body.timeout)
            try:
                await run_start_command(self.ctx, _key(request), info)  # a filesystem fork has no processes
            except StartFailed as exc:  # this fork failed (and is destroyed); the others stand, as in E2B
                results.append({"error": {"code": 502, "message": str(exc)}})
                continue
            self.ctx.remember_sandbox(info.id, _key(request), info.spec.labels.get(wire.LABEL_ENVD_TOKEN))
            results.append({"sandbox": wire.created(info)})
        return JSONResponse(results, 201)


# -- helpers ------------------------------------------------------------------------------------------------
def _key(request: Request) -> str | None:
    return request.scope.get("state", {}).get(STATE_API_KEY)


def _path_id(request: Request) -> str:
    return request.path_params["sandbox_id"]


async def read_model(request: Request, model: type[M]) -> M:
    """The JSON body as `model`: 413 over 1 MiB, 400 for malformed JSON or wrong field types."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > 1 << 20:
            raise ApiError(413, "request body over 1 MiB")
        chunks.append(chunk)
    data = parse_json(b"".join(chunks))
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from None


def _network(body: wire.NewSandboxBody) -> tuple[bool, list[str]]:
    """E2B's internet switch and allow/deny lists as dsec's egress allowlist (docs/network.md): internet on
    is everything allowed (`0.0.0.0/0`), off is no network, `allowOut` with off (or with `denyOut` of all
    traffic) is exactly those destinations."""
    internet = body.allow_internet_access if body.allow_internet_access is not None else True
    network = body.network or wire.NetworkBody()
    deny = network.denyOut or []
    if any(entry != ALL_TRAFFIC for entry in deny):
        raise ApiError(400, f"network.denyOut supports only {ALL_TRAFFIC!r} (deny all but allowOut): dsec filters egress by allowlist")
    if network.rules or network.egressProxy or network.dnsServers or network.maskRequestHost:
        raise ApiError(400, "network rules, egress proxy, DNS servers and host masking are not supported by dsec (docs/compat.md)")
    allow = network.allowOut or []
    if allow and (deny or not internet):
        return bool(deny) or internet, allow
    if deny:
        return False, []
    return internet, [ALL_TRAFFIC] if internet else []


def _metadata_filter(raw: str | None) -> dict[str, str]:
    """The SDK sends `metadata=urlencode({quote(k): quote(v)})`: decode both levels."""
    if not raw:
        return {}
    try:
        pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ApiError(400, "metadata filter must be URL-encoded key=value pairs") from None
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


def _states(raw: str | None) -> set[str]:
    if not raw:
        return {"running", "paused"}
    states = {s.strip() for s in raw.split(",") if s.strip()}
    unknown = states - {"running", "paused"}
    if unknown:
        raise ApiError(400, f"unknown sandbox state(s) {sorted(unknown)}: expected running, paused")
    return states


def _timestamp(raw: str) -> float:
    import datetime as dt

    try:
        parsed = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"startedAfter {raw!r} is not an RFC 3339 time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.timestamp()


T = TypeVar("T")


def _paginate(items: list[T], key: Callable[[T], tuple[float, str]], query: Any) -> tuple[list[T], str | None]:
    """A page of `items` ordered by (time, id) (`order` asc|desc, default desc), after the `nextToken` cursor."""
    order = query.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise ApiError(400, f"order {order!r}: expected asc or desc")
    raw_limit = query.get("limit")
    if raw_limit is None:
        limit = wire.MAX_PAGE
    elif raw_limit.isdigit() and 1 <= int(raw_limit) <= wire.MAX_PAGE:
        limit = int(raw_limit)
    else:
        raise ApiError(400, f"limit must be an integer between 1 and {wire.MAX_PAGE}")
    descending = order == "desc"
    items = sorted(items, key=key, reverse=descending)
    token = query.get("nextToken")
    if token:
        cursor = wire.decode_cursor(token)
        if cursor is None:
            raise ApiError(400, "nextToken was not issued by this server")
        items = [i for i in items if (key(i) < cursor if descending else key(i) > cursor)]
    page = items[:limit]
    next_token = wire.encode_cursor(*key(page[-1])) if len(items) > limit else None
    return page, next_token
