"""The content-addressed blob store: `blobs/sha256/<hex>`, OCI blobs (manifests, configs, layer tars) exactly as
received. A blob becomes visible by one rename after its digest was verified, so a reader never sees a wrong or
half-written one."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from dsec.errors import DiskFull, ImageNotFound, InvalidSpec, RuntimeFailure
from dsec.images.digest import HashingReader, hex_of, sha256_bytes
from dsec.images.workspace import Workspace


@contextlib.contextmanager
def disk_errors(what: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT into DiskFull and EIO into RuntimeFailure, with what to do next (the caller's temp files
    are already discarded, so nothing half-written is left visible)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left while {what}: free space or run `dsec images prune`") from exc
        if exc.errno == errno.EIO:
            raise RuntimeFailure(f"I/O error while {what}: the image store's disk failed; check it, retry") from exc
        raise


class BlobStore:
    def __init__(self, workspace: Workspace) -> None:
        self._ws = workspace
        self.dir = workspace.root / "blobs" / "sha256"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.dir / hex_of(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def put_bytes(self, data: bytes, expected: str | None = None) -> str:
        digest = sha256_bytes(data)
        if expected is not None and digest != expected:
            raise InvalidSpec(f"blob digest mismatch: expected {expected}, got {digest}; the blob was not stored")
        path = self.path(digest)
        if not path.exists():
            tmp = self._ws.new_tmp(".blob")
            with disk_errors(f"storing blob {digest}"):
                try:
                    tmp.write_bytes(data)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
        return digest

    def put_stream(self, src: BinaryIO, expected: str | None = None, limit: int | None = None) -> tuple[str, int]:
        """Stream `src` into the blob store (never all in memory), verifying `expected` before it becomes visible."""
        tmp = self._ws.new_tmp(".blob")
        try:
            with disk_errors("storing a blob"), open(tmp, "wb") as out:
                reader = HashingReader(src, tee=out, limit=limit)
                reader.drain()
            if expected is not None and reader.digest != expected:
                raise InvalidSpec(f"blob digest mismatch: expected {expected}, got {reader.digest}; the blob was not stored")
            os.replace(tmp, self.path(reader.digest))
            return reader.digest, reader.size
        finally:
            tmp.unlink(missing_ok=True)

    def read(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise ImageNotFound(f"blob {digest} is not in the store (pull or re-import the image)") from None
