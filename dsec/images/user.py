"""Resolve an image config's `User` (`name`, `uid`, `name:group`, `uid:gid`, ...) to numeric ids.

Why here and not in the sandbox: the runtime needs numbers before any process starts, and names only mean
something in the image's own /etc/passwd and /etc/group. Those files are untrusted image content, so they are
opened component by component without following symlinks (a planted `/etc/passwd -> /host/...` cannot make
us read host files) and read with a size cap.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from dsec.errors import InvalidSpec

MAX_DB_BYTES = 4 << 20  # an /etc/passwd larger than this is not a real one


def _read_in_root(root: Path, rel: str) -> str | None:
    """The text of `root/rel`, refusing symlinks anywhere on the way; None if it does not exist."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        parts = rel.split("/")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | (0 if last else os.O_DIRECTORY)
            try:
                nxt = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return None
                raise
            os.close(fd)
            fd = nxt
        data = os.read(fd, MAX_DB_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_DB_BYTES:
        raise InvalidSpec(f"the image's /{rel} is larger than {MAX_DB_BYTES} bytes: not a user database")
    return data.decode("utf-8", "replace")


def _read_in_layers(layers: list[Path], rel: str) -> str | None:
    """`rel` as the overlay of `layers` (top-most first) would show it: the top-most copy, unless whited out."""
    for layer in layers:
        path = layer / rel
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if st is not None and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return None  # a whiteout hides the file in every lower layer
        if st is not None:
            return _read_in_root(layer, rel)
        with contextlib.suppress(OSError):
            if os.getxattr(path.parent, "trusted.overlay.opaque", follow_symlinks=False) == b"y":
                return None  # an opaque directory hides the lower layers' contents
    return None


def _entries(roots: list[Path], rel: str) -> list[list[str]]:
    text = (_read_in_root(roots[0], rel) if len(roots) == 1 else _read_in_layers(roots, rel)) or ""
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _numeric(text: str) -> int | None:
    if text.isdigit():
        value = int(text)
        if value < 2**32 - 1:
            return value
    return None


def resolve_user(user: str, root: Path | list[Path], sandbox_id: str = "") -> tuple[int, int] | None:
    """`(uid, gid)` for the image config's `User` as seen in the image rooted at `root`; None when unset (root).

    `root` is a mounted root filesystem, or the image's layer dirs (top-most first) when none is mounted on
    this host (the Docker driver: dockerd mounts the rootfs).

    Same rules as Docker: a user name or a numeric uid; the gid is the explicit `:group` (name or number) or
    else the user's primary group from /etc/passwd (0 for a numeric uid the image does not list).
    """
    user = (user or "").strip()
    if not user:
        return None
    where = f" (sandbox {sandbox_id})" if sandbox_id else ""
    name, _, group = user.partition(":")
    if not name or (":" in group):
        raise InvalidSpec(f"image USER {user!r} is malformed{where}: use name, uid, name:group or uid:gid")
    roots = root if isinstance(root, list) else [root]
    passwd = _entries(roots, "etc/passwd")
    uid = _numeric(name)
    gid: int | None = None
    if uid is None:
        row = next((r for r in passwd if len(r) >= 4 and r[0] == name), None)
        if row is None or _numeric(row[2]) is None or _numeric(row[3]) is None:
            raise InvalidSpec(f"image USER {name!r} is not in the image's /etc/passwd{where}: add the user or use a numeric uid")
        uid, gid = _numeric(row[2]), _numeric(row[3])
    else:
        row = next((r for r in passwd if len(r) >= 4 and _numeric(r[2]) == uid), None)
        gid = _numeric(row[3]) if row is not None else 0
    if group:
        gid = _numeric(group)
        if gid is None:
            row = next((r for r in _entries(roots, "etc/group") if len(r) >= 3 and r[0] == group), None)
            if row is None or _numeric(row[2]) is None:
                raise InvalidSpec(f"image USER group {group!r} is not in the image's /etc/group{where}: add it or use a numeric gid")
            gid = _numeric(row[2])
    assert uid is not None and gid is not None
    return uid, gid
