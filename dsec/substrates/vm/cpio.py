"""A tiny writer for the `newc` cpio format the Linux initramfs loader reads.

Why our own: the host has no `cpio` binary, and writing the archive ourselves lets us add device nodes
(`/dev/console`) without root and without touching the host filesystem.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class CpioEntry:
    """One archive member: a directory, a regular file, a symlink (data = target) or a char device."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _header(ino: int, entry: CpioEntry, name: bytes) -> bytes:
    fields = [
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,
        0,  # mtime: fixed, so equal inputs give byte-equal archives (cache keys stay stable)
        len(entry.data),
        0,
        0,
        entry.rdev[0],
        entry.rdev[1],
        len(name) + 1,
        0,
    ]
    return b"070701" + b"".join(b"%08X" % value for value in fields)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def cpio_archive(entries: list[CpioEntry]) -> bytes:
    """Serialise `entries` (parents before children) into one gzip-compressed newc archive."""
    out = bytearray()
    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = entry.name.lstrip("/").encode()
        out += _header(ino if entry.name != "TRAILER!!!" else 0, entry, name)
        out += name + b"\0"
        out += _pad(len(out))
        out += entry.data
        out += _pad(len(out))
    return gzip.compress(bytes(out), compresslevel=6, mtime=0)


def directory(name: str) -> CpioEntry:
    return CpioEntry(name, stat.S_IFDIR | 0o755)


def regular(name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
    return CpioEntry(name, stat.S_IFREG | perm, data)


def char_device(name: str, major: int, minor: int) -> CpioEntry:
    return CpioEntry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))
