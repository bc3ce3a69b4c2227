"""`sandbox.files` operations beyond read/write/list: stat, exists, make_dir, rename, remove, list to a depth and
directory watches (FilesystemService, proto/dsec/v1/filesystem.proto). The same calls serve E2B's files API in
the HTTP front door, so both SDKs see one behaviour."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from dsec import wire
from dsec.errors import FileNotFoundInSandbox
from dsec.models import FsChange, PathInfo
from dsec.sdk.errors import to_dsec_error
from dsec.v1 import filesystem_pb2 as fpb
from dsec.v1 import filesystem_pb2_grpc as fpb_grpc

if TYPE_CHECKING:
    from dsec.sdk.sandbox import Sandbox


class DirWatcher:
    """A running watch: iterate it for FsChanges (or `get(timeout)`), `stop()` to end it. Created only once the
    sandbox armed the watch, so every change made after `watch()` returned is reported."""

    def __init__(self, call, first: fpb.WatchEvent) -> None:  # type: ignore[no-untyped-def]
        self._call = call
        self.path = first.started.path
        self._events: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True, name="dsec-watch").start()

    def _pump(self) -> None:
        try:
            for message in self._call:
                self._events.put(wire.from_pb_as(FsChange, message.change))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self._events.put(to_dsec_error(exc))
        self._events.put(None)

    def get(self, timeout: float | None = None) -> FsChange | None:
        """The next change; None once the watch ended; raises queue.Empty after `timeout` seconds without one."""
        item = self._events.get(timeout=timeout)
        if item is None:
            self._events.put(None)  # keep reporting the end
        if isinstance(item, Exception):
            raise item
        return item

    def __iter__(self) -> Iterator[FsChange]:
        while (item := self.get()) is not None:
            yield item

    def stop(self) -> None:
        self._call.cancel()

    def __enter__(self) -> DirWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FileOps:
    """Mixed into `Files`: needs `self._sb` (the Sandbox)."""

    _sb: Sandbox

    def _fs(self) -> fpb_grpc.FilesystemServiceStub:
        return fpb_grpc.FilesystemServiceStub(self._sb._client.channel)

    def _path(self, path: str, user: str) -> fpb.FsPath:
        return fpb.FsPath(sandbox_id=self._sb.id, path=path, user=user)

    def stat(self, path: str, user: str = "") -> PathInfo:
        """Metadata of `path` (a symlink is reported as one, with its target); FileNotFoundInSandbox if missing."""
        return wire.from_pb_as(PathInfo, self._sb._client.rpc(self._fs().Stat, self._path(path, user)).entry)

    def exists(self, path: str, user: str = "") -> bool:
        try:
            self.stat(path, user)
        except FileNotFoundInSandbox:
            return False
        return True

    def make_dir(self, path: str, mode: int = 0o755, user: str = "") -> bool:
        """Create `path` and its missing parents; False (nothing changed) when it is a directory already."""
        request = fpb.MakeDirRequest(target=self._path(path, user), mode=mode)
        return self._sb._client.rpc(self._fs().MakeDir, request).created

    def rename(self, source: str, destination: str, user: str = "") -> PathInfo:
        """Move `source` to `destination` (missing parents of the destination are created)."""
        request = fpb.MoveRequest(source=self._path(source, user), destination=destination)
        return wire.from_pb_as(PathInfo, self._sb._client.rpc(self._fs().Move, request).entry)

    def remove(self, path: str, missing_ok: bool = False, user: str = "") -> bool:
        """Remove a file, a symlink (not its target) or a whole directory tree; False if it was missing."""
        request = fpb.RemoveRequest(target=self._path(path, user), missing_ok=missing_ok)
        return self._sb._client.rpc(self._fs().Remove, request).removed

    def list_tree(self, path: str = "/", depth: int = 1, user: str = "") -> list[PathInfo]:
        """Entries under `path` down to `depth` levels (1 = the directory's own entries), with owners."""
        request = fpb.ListTreeRequest(target=self._path(path, user), depth=depth)
        return [wire.from_pb_as(PathInfo, e) for e in self._sb._client.rpc(self._fs().ListTree, request).entries]

    def watch(self, path: str, recursive: bool = False, user: str = "") -> DirWatcher:
        """Watch a directory; returns once the watch is armed. Use as a context manager or call `stop()`."""
        client = self._sb._client
        call = self._fs().Watch(
            fpb.WatchRequest(target=self._path(path, user), recursive=recursive), metadata=client.metadata
        )
        try:
            first = next(call)
        except grpc.RpcError as exc:
            raise to_dsec_error(exc) from None
        return DirWatcher(call, first)
