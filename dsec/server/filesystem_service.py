"""FilesystemService: stat with owners, make_dir, move, remove, listing to a depth, directory watches.

Why a service of its own: these are the file operations E2B's envd offers beyond read/write/list, and the HTTP
front door is a gRPC client of dsec (docs/compat.md), so they exist here first and the door, the cluster
gateway and dsec's SDK (`sandbox.files`) all use the same calls. Every operation goes through the agent inside
the sandbox (its root is the sandbox's), so no path, `..` or symlink reaches the host.

Users: a request may name a user of the sandbox (its /etc/passwd, read through the agent, so users added at run
time count). Relative paths and `~` then resolve against that user's home and what is created is owned by that
user, as envd does; without a user, relative paths resolve against the sandbox's working directory and the
sandbox's own user (the image's USER) owns what is created.
"""

from __future__ import annotations

import posixpath
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from dsec import wire
from dsec.errors import CapacityExceeded, DsecError, FileExistsInSandbox, FileNotFoundInSandbox, InvalidPath, InvalidSpec
from dsec.models import FileInfo, FsChange, PathInfo
from dsec.server.auth import Authenticator
from dsec.server.errors import rpc_errors
from dsec.server.manager import ManagedSandbox, SandboxManager
from dsec.server.paths import sandbox_path
from dsec.v1 import filesystem_pb2 as fpb
from dsec.v1 import filesystem_pb2_grpc as fpb_grpc

ACCOUNTS_MAX_BYTES = 4 << 20
MAX_TREE_ENTRIES = 100_000  # a listing larger than this is refused: ask for a smaller depth or a subdirectory
MAX_DEPTH = 64
WATCH_SHARE_OF_WORKERS = 4  # at most workers / 4 watches at once: each holds an RPC thread while it is open


@dataclass(frozen=True)
class Account:
    """Who a request acts as: owner ids for what it creates (None = leave as the agent makes them) and the base
    directory of relative paths."""

    owner: tuple[int, int] | None
    base: str
    home: str


def _read_small(sandbox: ManagedSandbox, path: str) -> str:
    data = b""
    try:
        for chunk in sandbox.handle.read_file(path):
            data += chunk
            if len(data) > ACCOUNTS_MAX_BYTES:
                raise InvalidSpec(f"{path} of sandbox {sandbox.sandbox_id} is larger than {ACCOUNTS_MAX_BYTES} bytes")
    except FileNotFoundInSandbox:
        return ""
    return data.decode("utf-8", "replace")


class Accounts:
    """The sandbox's /etc/passwd and /etc/group, read once per request (they may change while it runs)."""

    def __init__(self, sandbox: ManagedSandbox) -> None:
        self._sandbox = sandbox
        self._users: list[list[str]] | None = None
        self._groups: dict[int, str] | None = None

    def users(self) -> list[list[str]]:
        if self._users is None:
            lines = _read_small(self._sandbox, "/etc/passwd").splitlines()
            self._users = [f for f in (line.split(":") for line in lines) if len(f) >= 6 and f[2].isdigit() and f[3].isdigit()]
        return self._users

    def user_name(self, uid: int) -> str:
        return next((f[0] for f in self.users() if int(f[2]) == uid), str(uid))

    def group_name(self, gid: int) -> str:
        if self._groups is None:
            lines = _read_small(self._sandbox, "/etc/group").splitlines()
            self._groups = {int(f[2]): f[0] for f in (line.split(":") for line in lines) if len(f) >= 3 and f[2].isdigit()}
        return self._groups.get(gid, str(gid))

    def account(self, user: str) -> Account:
        sandbox = self._sandbox
        if not user:
            owner = sandbox_user(sandbox)
            home = next((f[5] or "/" for f in self.users() if owner and int(f[2]) == owner[0]), "/root")
            return Account(owner, sandbox.default_cwd(), home)
        for fields in self.users():
            if fields[0] == user:
                home = fields[5] or "/"
                return Account((int(fields[2]), int(fields[3])), home, home)
        raise InvalidSpec(f"user {user!r} does not exist in sandbox {sandbox.sandbox_id} (not in its /etc/passwd)")


def sandbox_user(sandbox: ManagedSandbox) -> tuple[int, int] | None:
    """The (uid, gid) the sandbox's processes run as (the image's USER), None for the agent's own (root)."""
    handle = getattr(sandbox.handle, "inner", sandbox.handle)  # the function substrate wraps a container
    return getattr(handle, "user", None)


def resolve(path: str, account: Account) -> str:
    """Absolute, normalised path: `~` is the user's home, relative paths start at the account's base; InvalidPath
    when it is malformed or climbs above the sandbox root."""
    if path == "~" or path.startswith("~/"):
        path = account.home.rstrip("/") + path[1:]
    return sandbox_path(path, account.base)


def entry_pb(info: FileInfo, path: str, accounts: Accounts) -> fpb.FsEntry:
    return wire.to_pb(PathInfo(
        name=posixpath.basename(path) or "/", path=path, type=info.type, size=info.size, mode=info.mode,
        mtime=info.mtime, owner=accounts.user_name(info.uid), group=accounts.group_name(info.gid),
        symlink_target=info.symlink_target,
    ))  # fmt: skip


class FilesystemService(fpb_grpc.FilesystemServiceServicer):
    def __init__(self, manager: SandboxManager, auth: Authenticator | None = None) -> None:
        self.manager = manager
        self.auth = auth or Authenticator({})
        self.max_watches = max(1, manager.config.workers // WATCH_SHARE_OF_WORKERS)
        self._watches = threading.BoundedSemaphore(self.max_watches)

    def _open(self, target: fpb.FsPath, context: grpc.ServicerContext) -> tuple[ManagedSandbox, Accounts, Account, str]:
        sandbox = self.manager.running(target.sandbox_id, self.auth.tenant(context))
        accounts = Accounts(sandbox)
        account = accounts.account(target.user)
        return sandbox, accounts, account, resolve(target.path, account)

    @rpc_errors
    def Stat(self, request: fpb.FsPath, context: grpc.ServicerContext) -> fpb.StatResponse:
        sandbox, accounts, _, path = self._open(request, context)
        return fpb.StatResponse(entry=entry_pb(sandbox.handle.stat_info(path), path, accounts))

    @rpc_errors
    def MakeDir(self, request: fpb.MakeDirRequest, context: grpc.ServicerContext) -> fpb.MakeDirResponse:
        sandbox, accounts, account, path = self._open(request.target, context)
        mode = request.mode or 0o755
        if mode > 0o7777:
            raise InvalidSpec(f"invalid directory mode {oct(mode)}")
        try:
            sandbox.handle.make_dir(path, mode, parents=True, owner=account.owner)
            created = True
        except FileExistsInSandbox:
            created = False
        return fpb.MakeDirResponse(created=created, entry=entry_pb(sandbox.handle.stat_info(path), path, accounts))

    @rpc_errors
    def Move(self, request: fpb.MoveRequest, context: grpc.ServicerContext) -> fpb.MoveResponse:
        sandbox, accounts, account, source = self._open(request.source, context)
        destination = resolve(request.destination, account)
        if source == "/" or destination == "/":
            raise InvalidPath(f"cannot move the root of sandbox {sandbox.sandbox_id}")
        sandbox.handle.move(source, destination, make_parents=True, owner=account.owner)
        return fpb.MoveResponse(entry=entry_pb(sandbox.handle.stat_info(destination), destination, accounts))

    @rpc_errors
    def Remove(self, request: fpb.RemoveRequest, context: grpc.ServicerContext) -> fpb.RemoveResponse:
        sandbox, _, _, path = self._open(request.target, context)
        if path == "/":
            raise InvalidPath(f"refusing to remove the root of sandbox {sandbox.sandbox_id}")
        try:
            sandbox.handle.remove(path, recursive=True)
        except FileNotFoundInSandbox:
            if not request.missing_ok:
                raise
            return fpb.RemoveResponse(removed=False)
        return fpb.RemoveResponse(removed=True)

    @rpc_errors
    def ListTree(self, request: fpb.ListTreeRequest, context: grpc.ServicerContext) -> fpb.ListTreeResponse:
        sandbox, accounts, _, root = self._open(request.target, context)
        depth = request.depth or 1
        if depth > MAX_DEPTH:
            raise InvalidSpec(f"depth {depth} is larger than {MAX_DEPTH}")
        response = fpb.ListTreeResponse()
        level = [root]  # a symlinked root is followed (the agent opens it as a directory); links below are not
        for _ in range(depth):
            below: list[str] = []
            for directory in level:
                try:
                    infos = sandbox.handle.list_dir_info(directory)
                except DsecError:
                    if directory == root:
                        raise
                    continue  # removed or unreadable meanwhile: list what is there
                for info in sorted(infos, key=lambda i: i.name):
                    path = posixpath.join(directory, info.name)
                    response.entries.append(entry_pb(info, path, accounts))
                    if info.type == "dir":
                        below.append(path)
                if len(response.entries) > MAX_TREE_ENTRIES:
                    raise InvalidSpec(
                        f"listing {root} to depth {depth} has more than {MAX_TREE_ENTRIES} entries; list a smaller "
                        "depth or a subdirectory"
                    )
            level = below
        return response

    @rpc_errors
    def Watch(self, request: fpb.WatchRequest, context: grpc.ServicerContext) -> Iterator[fpb.WatchEvent]:
        sandbox, _, _, path = self._open(request.target, context)
        if not self._watches.acquire(blocking=False):
            raise CapacityExceeded(
                f"this server has {self.max_watches} directory watches open (each holds an RPC thread); stop one, "
                "or raise the server's workers",
                retry_after_s=1.0,
            )
        try:
            watch = sandbox.handle.watch_dir(path, request.recursive)
            context.add_callback(watch.cancel)  # the client went away or cancelled: stop the agent's watch
            try:
                yield fpb.WatchEvent(started=fpb.WatchEvent.Started(path=path))
                for event in watch.events():
                    yield fpb.WatchEvent(change=wire.to_pb(FsChange(kind=event.kind, name=event.name)))
            finally:
                watch.cancel()
        finally:
            self._watches.release()

    @rpc_errors
    def Resolve(self, request: fpb.ResolveRequest, context: grpc.ServicerContext) -> fpb.ResolvedPath:
        sandbox, _, account, path = self._open(request.target, context)
        if request.make_parents and path != "/":
            try:
                sandbox.handle.make_dir(posixpath.dirname(path), 0o755, parents=True, owner=account.owner)
            except FileExistsInSandbox:
                pass
        uid, gid = account.owner if account.owner is not None else (-1, -1)
        return fpb.ResolvedPath(path=path, uid=uid, gid=gid, home=account.home)

    @rpc_errors
    def Chown(self, request: fpb.FsPath, context: grpc.ServicerContext) -> fpb.StatResponse:
        sandbox, accounts, account, path = self._open(request, context)
        if account.owner is not None:
            sandbox.handle.chown(path, *account.owner)
        return fpb.StatResponse(entry=entry_pb(sandbox.handle.stat_info(path), path, accounts))


def add_filesystem_service(server: grpc.Server, manager: SandboxManager, auth: Authenticator | None = None) -> None:
    fpb_grpc.add_FilesystemServiceServicer_to_server(FilesystemService(manager, auth), server)
