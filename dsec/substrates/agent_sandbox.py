"""`AgentSandbox`: the `DriverSandbox` whose processes and files go through the in-sandbox agent.

It lives in the substrate layer (it implements the driver protocol) on top of `dsec.agent.client`, which only
speaks the agent's wire protocol; the container, Docker and VM drivers subclass it.
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Iterable, Iterator

from dsec.agent.client import AgentClient
from dsec.errors import InvalidPath, RuntimeFailure
from dsec.models import FileEntry, FileInfo
from dsec.substrates.base import DirWatch, DriverSandbox, Exited, Output, ProcessHandle

MV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # `mv` for cross-device moves


class AgentSandbox(DriverSandbox):
    """A sandbox whose processes and files go through its agent; drivers subclass it for limits and pause."""

    user: tuple[int, int] | None = None  # (uid, gid) every spawn runs as: the image's USER; None = the agent's (root)

    def __init__(self, sandbox_id: str, client: AgentClient) -> None:
        self.sandbox_id = sandbox_id
        self.client = client
        if not client.sandbox_id:
            client.sandbox_id = sandbox_id

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        stdin: bool = False,
        pty: tuple[int, int] | None = None,
        user: tuple[int, int] | None = None,
    ) -> ProcessHandle:
        uid, gid = user or self.user or (None, None)
        return self.client.spawn(argv, env, cwd, stdin, uid=uid, gid=gid, pty=pty)

    def launch(self, argv: list[str], env: dict[str, str], cwd: str) -> ProcessHandle:
        uid, gid = self.user or (None, None)
        return self.client.launch(argv, env, cwd, uid=uid, gid=gid)

    def read_file(self, path: str) -> Iterator[bytes]:
        return self.client.read_file(path)

    def write_file(self, path: str, chunks: Iterable[bytes], mode: int = 0o644, make_parents: bool = True) -> int:
        return self.client.write_file(path, chunks, mode, make_parents)

    def list_dir(self, path: str) -> list[FileEntry]:
        return self.client.list_dir(path)

    def stat(self, path: str) -> FileEntry:
        return self.client.stat(path)

    def stat_info(self, path: str) -> FileInfo:
        return self.client.stat_info(path)

    def list_dir_info(self, path: str) -> list[FileInfo]:
        return self.client.list_dir_info(path)

    def make_dir(self, path: str, mode: int = 0o755, parents: bool = True, owner: tuple[int, int] | None = None) -> None:
        self.client.make_dir(path, mode, parents, owner)

    def move(self, source: str, destination: str, make_parents: bool = True, owner: tuple[int, int] | None = None) -> None:
        """rename(2); where it cannot (EXDEV: overlayfs renames a directory of the image only by copying, or the
        two paths are on different mounts) `mv` in the sandbox copies and removes, as a shell user would."""
        try:
            self.client.move(source, destination, make_parents, owner)
        except RuntimeFailure as exc:
            if exc.details.get("errno") != errno_mod.EXDEV:
                raise
            self._mv(source, destination)

    def _mv(self, source: str, destination: str) -> None:
        process = self.spawn(["mv", "-f", "--", source, destination], {"PATH": MV_PATH}, "/")
        stderr = b""
        for event in process.events():
            if isinstance(event, Output) and event.stream == "stderr":
                stderr = (stderr + event.data)[-2000:]
            elif isinstance(event, Exited) and event.exit_code != 0:
                raise InvalidPath(
                    f"move {source} to {destination}{self.client.where}: mv exited {event.exit_code}: "
                    f"{stderr.decode(errors='replace').strip()}",
                    sandbox_id=self.sandbox_id,
                )

    def remove(self, path: str, recursive: bool = True) -> None:
        self.client.remove(path, recursive)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.client.chown(path, uid, gid)

    def watch_dir(self, path: str, recursive: bool = False) -> DirWatch:
        return self.client.watch_dir(path, recursive)

    def close(self) -> None:
        """Drop the agent connection (its processes die with it); the driver then tears the sandbox down."""
        self.client.close()
