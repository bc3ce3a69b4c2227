"""Directory trees in and out of a sandbox as tar streams, through the sandbox's own `tar`.

Running tar inside the sandbox (not on the host) means paths in the archive are resolved within the
sandbox's root: `..` entries and symlinks cannot reach host files, whatever the substrate.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator

from dsec.errors import InvalidPath, RuntimeFailure
from dsec.substrates.base import DriverSandbox, Exited, Output

_TAR_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def upload_tar(sandbox: DriverSandbox, dest: str, chunks: Iterable[bytes]) -> int:
    """Unpack a tar stream under `dest` (created if missing); returns bytes received."""
    _run_checked(sandbox, ["mkdir", "-p", dest], f"cannot create {dest}")
    process = sandbox.spawn(["tar", "-x", "-f", "-", "-C", dest], _TAR_ENV, "/", stdin=True)
    total = 0
    try:
        for chunk in chunks:
            total += len(chunk)
            process.write_stdin(chunk)
    finally:
        process.close_stdin()
    stderr, code = b"", -1
    for event in process.events():
        if isinstance(event, Output) and event.stream == "stderr":
            stderr += event.data
        elif isinstance(event, Exited):
            code = event.exit_code
    if code != 0:
        raise InvalidPath(f"upload to {dest} failed in sandbox {sandbox.sandbox_id}: {stderr.decode(errors='replace').strip()}")
    return total


def download_tar(sandbox: DriverSandbox, path: str) -> Iterator[bytes]:
    """Stream a tar of `path` (a file or directory) rooted at its basename."""
    parent, name = posixpath.split(path.rstrip("/") or "/")
    if not name:
        parent, name = "/", "."
    process = sandbox.spawn(["tar", "-c", "-f", "-", "-C", parent or "/", name], _TAR_ENV, "/")
    stderr, code = b"", -1
    for event in process.events():
        if isinstance(event, Output):
            if event.stream == "stdout":
                yield event.data
            else:
                stderr += event.data
        elif isinstance(event, Exited):
            code = event.exit_code
    if code != 0:
        raise InvalidPath(f"download of {path} failed in sandbox {sandbox.sandbox_id}: {stderr.decode(errors='replace').strip()}")


def _run_checked(sandbox: DriverSandbox, argv: list[str], what: str) -> None:
    stderr, code = b"", -1
    for event in sandbox.spawn(argv, _TAR_ENV, "/").events():
        if isinstance(event, Output) and event.stream == "stderr":
            stderr += event.data
        elif isinstance(event, Exited):
            code = event.exit_code
    if code != 0:
        raise RuntimeFailure(f"{what} in sandbox {sandbox.sandbox_id}: {stderr.decode(errors='replace').strip()}")
