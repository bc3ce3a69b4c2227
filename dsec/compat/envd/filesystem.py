"""envd's Connect-RPC `filesystem.Filesystem` on the front door, as calls on dsec's FilesystemService.

Served with the maintained Connect runtime (`connectrpc`, the one the e2b SDK pins) over the google.protobuf
messages generated from proto/envd/filesystem.proto; the endpoint table mirrors the SDK's generated
`filesystem_connect.py`. Each handler turns one envd call into gRPC calls on the backend as the caller's tenant
(the key the dispatcher put in `scope["state"]`), so nothing here touches a sandbox directly: every path is
resolved by the agent inside the sandbox.

envd semantics kept: relative paths and `~` resolve against the user's home (user from `Authorization: Basic`,
else envd's default user `user` when the sandbox has one, else the sandbox's own user); ListDir depth 0 = 1 and
a symlinked directory is followed at the top only; MakeDir of an existing directory is ALREADY_EXISTS (the SDK
returns False); Remove of a missing path succeeds (os.RemoveAll); Move creates the destination's parents.
Watches: WatchDir streams a start event, then events (keepalives while idle, at the interval the client asks);
the polling watcher (CreateWatcher / GetWatcherEvents / RemoveWatcher) buffers events of a watch kept open on
the backend until it is removed, idle for WATCHER_IDLE_S, or its sandbox goes away.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint
from google.protobuf.timestamp_pb2 import Timestamp

from dsec.compat.context import CompatContext, error_name, grpc_code, grpc_message
from dsec.compat.envd.rpc import caller, envd_codecs, envd_user, keepalive_interval, scoped
from dsec.envd.filesystem import filesystem_pb2 as epb
from dsec.v1 import filesystem_pb2 as fpb
from dsec.v1 import filesystem_pb2_grpc as fpb_grpc

log = logging.getLogger("dsec.compat.envd")

SERVICE = "filesystem.Filesystem"
ENVD_DEFAULT_USER = "user"  # E2B templates' default user; used when the sandbox has one
WATCHER_IDLE_S = 300.0  # a polling watcher nobody asked for events this long is dropped (it holds a server watch)
WATCHER_MAX_EVENTS = 10_000  # buffered per polling watcher; older events are dropped beyond this
MAX_WATCHERS_PER_SANDBOX = 8  # each is a backend Watch stream; the server caps those too
MAX_REMEMBERED_SANDBOXES = 10_000

_TYPES = {"file": epb.FILE_TYPE_FILE, "dir": epb.FILE_TYPE_DIRECTORY, "symlink": epb.FILE_TYPE_SYMLINK}
_EVENTS = {
    "create": epb.EVENT_TYPE_CREATE, "write": epb.EVENT_TYPE_WRITE, "remove": epb.EVENT_TYPE_REMOVE,
    "rename": epb.EVENT_TYPE_RENAME, "chmod": epb.EVENT_TYPE_CHMOD,
}  # fmt: skip
_TYPE_CHARS = {"file": "-", "dir": "d", "symlink": "L", "other": "?"}  # Go's FileMode.String(), which envd reports


# -- shared with the /files routes ---------------------------------------------------------------------------
class UserDefaults:
    """Per sandbox: whether envd's default user exists there (asked once; users are rarely removed)."""

    def __init__(self) -> None:
        self._known: dict[str, str] = {}

    async def user_for(self, stub: Any, sandbox_id: str, requested: str) -> str:
        if requested:
            return requested
        if sandbox_id not in self._known:
            if len(self._known) >= MAX_REMEMBERED_SANDBOXES:
                self._known.clear()  # asked again on next use: cheap, and bounds memory on a long-running door
            try:
                await stub.Resolve(fpb.ResolveRequest(target=fpb.FsPath(sandbox_id=sandbox_id, path="/", user=ENVD_DEFAULT_USER)))
                self._known[sandbox_id] = ENVD_DEFAULT_USER
            except grpc.RpcError as exc:
                if grpc_code(exc) != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                self._known[sandbox_id] = ""  # no such user: the sandbox's own user applies
        return self._known[sandbox_id]



def connect_error(exc: grpc.RpcError) -> ConnectError:
    """The Connect status for a backend error: the same code (gRPC and Connect share them), dsec's message.
    A sandbox that does not exist is UNAVAILABLE "... was not found", as E2B's proxy answers, so the SDK reports
    it as not running rather than as a missing file."""
    code = grpc_code(exc)
    if error_name(exc) == "SandboxNotFound":
        return ConnectError(Code.UNAVAILABLE, f"{grpc_message(exc)}: the sandbox was not found")
    try:
        connect_code = Code[code.name]
    except KeyError:
        connect_code = Code.UNKNOWN
    message = grpc_message(exc) or code.name
    name = error_name(exc)
    return ConnectError(connect_code, f"{message} ({name})" if name else message)


# -- conversions ---------------------------------------------------------------------------------------------
def permissions(kind: str, mode: int) -> str:
    bits = "".join(c if mode & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx"))
    return _TYPE_CHARS.get(kind, "?") + bits


def entry_info(entry: fpb.FsEntry) -> epb.EntryInfo:
    info = epb.EntryInfo(
        name=entry.name, type=_TYPES.get(entry.type, epb.FILE_TYPE_UNSPECIFIED), path=entry.path, size=entry.size,
        mode=entry.mode & 0o777, permissions=permissions(entry.type, entry.mode), owner=entry.owner,
        group=entry.group, is_symlink=entry.type == "symlink",
    )  # fmt: skip
    if entry.mtime:
        stamp = Timestamp()
        stamp.FromNanoseconds(int(entry.mtime * 1e9))
        info.modified_time.CopyFrom(stamp)
    if entry.type == "symlink":
        info.symlink_target = entry.symlink_target
    return info


# -- polling watchers -----------------------------------------------------------------------------------------
@dataclass
class Watcher:
    """A backend Watch kept open for the polling API; events wait in `events` until asked for."""

    sandbox_id: str
    api_key: str | None  # only its creator (same sandbox, same key) may read or remove it
    call: Any
    include_entry: bool
    events: list[epb.FilesystemEvent] = field(default_factory=list)
    error: ConnectError | None = None
    ended: bool = False
    last_poll: float = field(default_factory=time.monotonic)
    task: asyncio.Task | None = None


class FilesystemService:
    """The handlers; one instance per front door."""

    def __init__(self, ctx: CompatContext) -> None:
        self.ctx = ctx
        self.users = UserDefaults()
        self.watchers: dict[str, Watcher] = {}

    # -- plumbing -----------------------------------------------------------------------------------------
    def _caller(self, rctx: RequestContext) -> tuple[Any, str, str]:
        """(stub, sandbox id, user named by the request)."""
        who = caller()
        stub = self.ctx.stub(fpb_grpc.FilesystemServiceStub, who.api_key)
        return stub, who.sandbox_id, envd_user(rctx) or ""

    async def _target(self, rctx: RequestContext, path: str) -> tuple[Any, fpb.FsPath]:
        stub, sandbox_id, user = self._caller(rctx)
        if not path:
            raise ConnectError(Code.INVALID_ARGUMENT, "path is required")
        try:
            user = await self.users.user_for(stub, sandbox_id, user)
        except grpc.RpcError as exc:
            raise connect_error(exc) from None
        return stub, fpb.FsPath(sandbox_id=sandbox_id, path=path, user=user)

    @staticmethod
    async def _call(method: Any, request: Any) -> Any:
        try:
            return await method(request)
        except grpc.RpcError as exc:
            raise connect_error(exc) from None

    async def _entry(self, stub: Any, target: fpb.FsPath, name: str) -> epb.EntryInfo | None:
        """The entry an event is about, when it still exists (include_entry)."""
        path = target.path.rstrip("/") + "/" + name
        try:
            reply = await stub.Stat(fpb.FsPath(sandbox_id=target.sandbox_id, path=path, user=target.user))
        except grpc.RpcError:
            return None
        return entry_info(reply.entry)

    # -- unary calls ----------------------------------------------------------------------------------------
    async def stat(self, request: epb.StatRequest, rctx: RequestContext) -> epb.StatResponse:
        stub, target = await self._target(rctx, request.path)
        reply = await self._call(stub.Stat, target)
        return epb.StatResponse(entry=entry_info(reply.entry))

    async def make_dir(self, request: epb.MakeDirRequest, rctx: RequestContext) -> epb.MakeDirResponse:
        stub, target = await self._target(rctx, request.path)
        reply = await self._call(stub.MakeDir, fpb.MakeDirRequest(target=target))
        if not reply.created:
            raise ConnectError(Code.ALREADY_EXISTS, f"directory already exists: {reply.entry.path}")
        return epb.MakeDirResponse(entry=entry_info(reply.entry))

    async def move(self, request: epb.MoveRequest, rctx: RequestContext) -> epb.MoveResponse:
        stub, target = await self._target(rctx, request.source)
        if not request.destination:
            raise ConnectError(Code.INVALID_ARGUMENT, "destination is required")
        reply = await self._call(stub.Move, fpb.MoveRequest(source=target, destination=request.destination))
        return epb.MoveResponse(entry=entry_info(reply.entry))

    async def list_dir(self, request: epb.ListDirRequest, rctx: RequestContext) -> epb.ListDirResponse:
        stub, target = await self._target(rctx, request.path)
        reply = await self._call(stub.ListTree, fpb.ListTreeRequest(target=target, depth=request.depth or 1))
        return epb.ListDirResponse(entries=[entry_info(e) for e in reply.entries])

    async def remove(self, request: epb.RemoveRequest, rctx: RequestContext) -> epb.RemoveResponse:
        stub, target = await self._target(rctx, request.path)
        await self._call(stub.Remove, fpb.RemoveRequest(target=target, missing_ok=True))
        return epb.RemoveResponse()

    # -- streaming watch ------------------------------------------------------------------------------------
    async def _open_watch(self, rctx: RequestContext, path: str, recursive: bool) -> tuple[Any, fpb.FsPath, Any]:
        stub, target = await self._target(rctx, path)
        call = stub.Watch(fpb.WatchRequest(target=target, recursive=recursive))
        try:
            first = await call.read()
        except grpc.RpcError as exc:
            raise connect_error(exc) from None
        if first is grpc.aio.EOF or not first.HasField("started"):
            call.cancel()
            raise ConnectError(Code.UNAVAILABLE, f"watch of {path} ended before it started")
        target.path = first.started.path  # events name entries relative to the resolved directory
        return stub, target, call

    async def _event(self, stub: Any, target: fpb.FsPath, change: Any, include_entry: bool) -> epb.FilesystemEvent | None:
        kind = _EVENTS.get(change.kind)
        if kind is None:
            return None
        event = epb.FilesystemEvent(name=change.name, type=kind)
        if include_entry and change.kind not in ("remove", "rename"):
            entry = await self._entry(stub, target, change.name)
            if entry is not None:
                event.entry.CopyFrom(entry)
        return event

    async def watch_dir(self, request: epb.WatchDirRequest, rctx: RequestContext) -> AsyncIterator[epb.WatchDirResponse]:
        stub, target, call = await self._open_watch(rctx, request.path, request.recursive)
        interval = keepalive_interval(rctx)
        try:
            yield epb.WatchDirResponse(start=epb.WatchDirResponse.StartEvent())
            reader = asyncio.ensure_future(call.read())
            while True:
                done, _ = await asyncio.wait({reader}, timeout=interval)
                if not done:
                    yield epb.WatchDirResponse(keepalive=epb.WatchDirResponse.KeepAlive())
                    continue
                try:
                    message = reader.result()
                except grpc.RpcError as exc:
                    if grpc_code(exc) == grpc.StatusCode.CANCELLED:
                        return
                    raise connect_error(exc) from None
                if message is grpc.aio.EOF:
                    return  # the directory went away
                event = await self._event(stub, target, message.change, request.include_entry)
                if event is not None:
                    yield epb.WatchDirResponse(filesystem=event)
                reader = asyncio.ensure_future(call.read())
        finally:
            call.cancel()

    # -- polling watchers -----------------------------------------------------------------------------------
    async def create_watcher(self, request: epb.CreateWatcherRequest, rctx: RequestContext) -> epb.CreateWatcherResponse:
        self._reap_idle()
        stub, target, call = await self._open_watch(rctx, request.path, request.recursive)
        if sum(1 for w in self.watchers.values() if w.sandbox_id == target.sandbox_id) >= MAX_WATCHERS_PER_SANDBOX:
            call.cancel()
            raise ConnectError(
                Code.RESOURCE_EXHAUSTED,
                f"sandbox {target.sandbox_id} has {MAX_WATCHERS_PER_SANDBOX} watchers already; remove one first",
            )
        watcher_id = uuid.uuid4().hex
        watcher = self.watchers[watcher_id] = Watcher(target.sandbox_id, caller().api_key, call, request.include_entry)
        watcher.task = asyncio.ensure_future(self._pump(watcher, stub, target))
        return epb.CreateWatcherResponse(watcher_id=watcher_id)

    async def _pump(self, watcher: Watcher, stub: Any, target: fpb.FsPath) -> None:
        try:
            while (message := await watcher.call.read()) is not grpc.aio.EOF:  # read(): the start was read() too
                event = await self._event(stub, target, message.change, watcher.include_entry)
                if event is not None:
                    watcher.events.append(event)
                    del watcher.events[:-WATCHER_MAX_EVENTS]
        except grpc.RpcError as exc:
            if grpc_code(exc) != grpc.StatusCode.CANCELLED:
                watcher.error = connect_error(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the next poll, never lost in a task
            log.exception("envd watcher of sandbox %s failed", watcher.sandbox_id)
            watcher.error = ConnectError(Code.INTERNAL, f"watch failed: {exc}")
        finally:
            watcher.ended = True

    def _watcher(self, watcher_id: str) -> Watcher:
        who = caller()
        sandbox_id = who.sandbox_id
        watcher = self.watchers.get(watcher_id)
        if watcher is None or watcher.sandbox_id != sandbox_id or watcher.api_key != who.api_key:
            raise ConnectError(Code.NOT_FOUND, f"watcher {watcher_id!r} not found in sandbox {sandbox_id}")
        return watcher

    async def get_watcher_events(self, request: epb.GetWatcherEventsRequest, rctx: RequestContext) -> epb.GetWatcherEventsResponse:
        watcher = self._watcher(request.watcher_id)
        watcher.last_poll = time.monotonic()
        events, watcher.events = watcher.events, []
        if not events and watcher.error is not None:
            self._drop(request.watcher_id)
            raise watcher.error
        return epb.GetWatcherEventsResponse(events=events)

    async def remove_watcher(self, request: epb.RemoveWatcherRequest, rctx: RequestContext) -> epb.RemoveWatcherResponse:
        self._watcher(request.watcher_id)
        self._drop(request.watcher_id)
        return epb.RemoveWatcherResponse()

    def _drop(self, watcher_id: str) -> None:
        watcher = self.watchers.pop(watcher_id, None)
        if watcher is not None:
            watcher.call.cancel()

    def _reap_idle(self) -> None:
        now = time.monotonic()
        for watcher_id, watcher in list(self.watchers.items()):
            if now - watcher.last_poll > WATCHER_IDLE_S or (watcher.ended and watcher.error is not None and not watcher.events):
                self._drop(watcher_id)


def _method(name: str, request: type, response: type) -> MethodInfo:
    return MethodInfo(name=name, service_name=SERVICE, input=request, output=response, idempotency_level=IdempotencyLevel.UNKNOWN)


class FilesystemConnectApp(ConnectASGIApplication[FilesystemService]):
    """The Connect endpoints of `filesystem.Filesystem` (the SDK's filesystem_connect.py table)."""

    def __init__(self, service: FilesystemService) -> None:
        super().__init__(
            service=service,
            endpoints=lambda svc: {
                f"/{SERVICE}/Stat": Endpoint.unary(method=_method("Stat", epb.StatRequest, epb.StatResponse), function=svc.stat),
                f"/{SERVICE}/MakeDir": Endpoint.unary(
                    method=_method("MakeDir", epb.MakeDirRequest, epb.MakeDirResponse), function=svc.make_dir
                ),
                f"/{SERVICE}/Move": Endpoint.unary(method=_method("Move", epb.MoveRequest, epb.MoveResponse), function=svc.move),
                f"/{SERVICE}/ListDir": Endpoint.unary(
                    method=_method("ListDir", epb.ListDirRequest, epb.ListDirResponse), function=svc.list_dir
                ),
                f"/{SERVICE}/Remove": Endpoint.unary(
                    method=_method("Remove", epb.RemoveRequest, epb.RemoveResponse), function=svc.remove
                ),
                f"/{SERVICE}/WatchDir": Endpoint.server_stream(
                    method=_method("WatchDir", epb.WatchDirRequest, epb.WatchDirResponse), function=svc.watch_dir
                ),
                f"/{SERVICE}/CreateWatcher": Endpoint.unary(
                    method=_method("CreateWatcher", epb.CreateWatcherRequest, epb.CreateWatcherResponse),
                    function=svc.create_watcher,
                ),
                f"/{SERVICE}/GetWatcherEvents": Endpoint.unary(
                    method=_method("GetWatcherEvents", epb.GetWatcherEventsRequest, epb.GetWatcherEventsResponse),
                    function=svc.get_watcher_events,
                ),
                f"/{SERVICE}/RemoveWatcher": Endpoint.unary(
                    method=_method("RemoveWatcher", epb.RemoveWatcherRequest, epb.RemoveWatcherResponse),
                    function=svc.remove_watcher,
                ),
            },
            codecs=envd_codecs(),
        )

    @property
    def path(self) -> str:
        return f"/{SERVICE}"


def make_app(ctx: CompatContext) -> Any:
    """The Connect app, wrapped so handlers see the dispatcher's `scope["state"]` (sandbox id, caller's key)."""
    return scoped(FilesystemConnectApp(FilesystemService(ctx)))
