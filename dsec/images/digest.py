"""sha256 digests: validation and streaming hashing.

Every byte that enters the store passes through a `HashingReader`, so a blob or layer is verified in the
same single pass that writes it (no second read of multi-GB layers).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import BinaryIO

from dsec.errors import InvalidSpec

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
CHUNK = 1 << 20
COPY_CHUNK = 4 << 20  # big reads: hashlib releases the GIL per update, few syscalls per layer


def check_digest(digest: str) -> str:
    """Return `digest` if it is a well-formed sha256 digest, else raise InvalidSpec (never a path trick)."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise InvalidSpec(f"malformed digest {digest!r}: expected 'sha256:' followed by 64 lowercase hex digits")
    return digest


def hex_of(digest: str) -> str:
    return check_digest(digest).split(":", 1)[1]


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class HashingReader:
    """A read-only file object that hashes (and optionally copies to `tee`) everything read through it."""

    def __init__(self, raw: BinaryIO, tee: BinaryIO | None = None, limit: int | None = None) -> None:
        self._raw = raw
        self._tee = tee
        self._hash = hashlib.sha256()
        self._limit = limit
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n if n is not None and n >= 0 else -1)
        if data:
            self._hash.update(data)
            if self._tee is not None:
                self._tee.write(data)
            self.size += len(data)
            if self._limit is not None and self.size > self._limit:
                raise InvalidSpec(f"stream longer than its declared size {self._limit}: rejected")
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        """Read to EOF so the digest covers the whole stream (tar readers stop at the end-of-archive marker)."""
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def copy_hashing(src: BinaryIO, dest: Path, limit: int | None = None) -> tuple[str, int]:
    """Copy `src` into the new file `dest`, returning (sha256 digest, size); longer than `limit` → InvalidSpec.

    Used to land a layer blob on disk before extracting it: one userspace pass (read, hash, write), after
    which extraction copies file contents out of the landed blob inside the kernel (copy_file_range).
    """
    digest = hashlib.sha256()
    size = 0
    with open(dest, "wb") as out:
        while True:
            data = src.read(COPY_CHUNK)
            if not data:
                break
            size += len(data)
            if limit is not None and size > limit:
                raise InvalidSpec(f"stream longer than its declared size {limit}: rejected")
            digest.update(data)
            out.write(data)
    return "sha256:" + digest.hexdigest(), size
