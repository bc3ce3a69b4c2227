"""Validate paths given to file calls before they reach a sandbox."""

from __future__ import annotations

import posixpath

from dsec.errors import InvalidPath

MAX_PATH = 4096


def sandbox_path(path: str, cwd: str = "/") -> str:
    """Return an absolute, normalised path, or raise InvalidPath if it is malformed or climbs above `/`.

    Inside the sandbox the agent is chrooted, so `..` could not reach the host anyway; rejecting it here
    turns a confused or hostile request into a clear error instead of a silently clamped path.
    """
    if not path:
        raise InvalidPath("empty path")
    if "\0" in path:
        raise InvalidPath("path contains a NUL byte")
    if len(path) > MAX_PATH:
        raise InvalidPath(f"path longer than {MAX_PATH} bytes")
    full = path if path.startswith("/") else posixpath.join(cwd or "/", path)
    depth = 0
    for part in full.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            depth -= 1
            if depth < 0:
                raise InvalidPath(f"path {path!r} escapes the sandbox root")
        else:
            depth += 1
    return posixpath.normpath(full)
