"""The one driver protocol every substrate implements.

The server only ever talks to `SandboxDriver` and `DriverSandbox`; adding a substrate or a runtime
(crun, runc, Docker, QEMU microvm, QEMU q35) means a module that implements these plus one `register` call
(dsec/substrates/registry.py; the recipe is in docs/ARCHITECTURE.md, "Adding a substrate"). Optional abilities
(pause, snapshot, call, writable_layer, ports…) are methods that raise `Unsupported` until a substrate overrides
them. Exec, sessions, uploads and downloads are built by the server on top of `spawn` + files, so they behave
identically everywhere.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

# What a sandbox's processes and watches yield (agent/events.py) and what the layer store resolves an image to
# (images/types.py) are defined in the layer that produces them; drivers find them here too.
from dsec.agent.events import DirWatch, Exited, FsEvent, Output, ProcessEvent, ProcessHandle
from dsec.errors import Unsupported
from dsec.images.types import ImageConfig, ImageRootfs
from dsec.models import FileEntry, FileInfo, PauseKind, SandboxSpec


def volume_image(volumes_dir: Path, name: str) -> Path:
    """A named volume's ext4 image (dsec/server/volumes.py), which a VM attaches as a disk."""
    return volumes_dir / name / "volume.ext4"


def volume_source(volumes_dir: Path, name: str) -> Path:
    """Where the server has mounted a named volume on the host while sandboxes use it (dsec/server/volumes.py):
    a container driver binds this path into the sandbox."""
    return volumes_dir / name / "mnt"


def snapshot_target_full(path: Path) -> bool:
    """Whether the filesystem a snapshot was being written to is (nearly) out of space: tar and QEMU report a
    write that ENOSPC cut short only as "Wrote only N of M bytes" or "migrate failed", so drivers ask the
    filesystem before choosing between DiskFull and RuntimeFailure."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


@dataclass(frozen=True)
class Usage:
    """Resource use of a sandbox, read where its substrate keeps it (cgroups, the guest's /proc); counters are
    cumulative so the server turns two samples into a CPU percentage. Why: `Metrics` (E2B's get_metrics)."""

    cpu_seconds: float
    cpu_limit: float  # cores the sandbox may use
    mem_used_bytes: int
    mem_total_bytes: int
    mem_cache_bytes: int = 0
    disk_used_bytes: int = 0
    disk_total_bytes: int = 0


class DriverSandbox(abc.ABC):
    """A live sandbox as its driver sees it."""

    sandbox_id: str
    accel: str = ""

    @abc.abstractmethod
    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        stdin: bool = False,
        pty: tuple[int, int] | None = None,
        user: tuple[int, int] | None = None,
    ) -> ProcessHandle:
        """Start a process; raises CommandNotFound / PermissionDeniedInSandbox when exec fails.
        `pty=(cols, rows)` runs it on a terminal of that size; `user=(uid, gid)` overrides the sandbox's user."""

    def launch(self, argv: list[str], env: dict[str, str], cwd: str) -> ProcessHandle:
        """`spawn` of a process without stdin or PTY that may return before its start is confirmed: a failed exec
        (CommandNotFound...) may then be raised by the first step of `events()`. The exec engine uses it: an
        agent-based sandbox saves its caller one wake-up per command (AgentSandbox); the default is `spawn`."""
        return self.spawn(argv, env, cwd)

    @abc.abstractmethod
    def read_file(self, path: str) -> Iterator[bytes]: ...

    @abc.abstractmethod
    def write_file(self, path: str, chunks: Iterable[bytes], mode: int = 0o644, make_parents: bool = True) -> int: ...

    @abc.abstractmethod
    def list_dir(self, path: str) -> list[FileEntry]: ...

    # -- filesystem operations (E2B-style files API); every agent-based sandbox implements them ----------------
    def stat_info(self, path: str) -> FileInfo:
        """Like lstat, with owner ids and the link target."""
        raise Unsupported(f"stat is not supported by this substrate (sandbox {self.sandbox_id})")

    def list_dir_info(self, path: str) -> list[FileInfo]:
        raise Unsupported(f"listing with owners is not supported by this substrate (sandbox {self.sandbox_id})")

    def make_dir(self, path: str, mode: int = 0o755, parents: bool = True, owner: tuple[int, int] | None = None) -> None:
        """Create a directory (and its parents); raises InvalidPath (EEXIST) when it exists already."""
        raise Unsupported(f"make_dir is not supported by this substrate (sandbox {self.sandbox_id})")

    def move(self, source: str, destination: str, make_parents: bool = True, owner: tuple[int, int] | None = None) -> None:
        raise Unsupported(f"move is not supported by this substrate (sandbox {self.sandbox_id})")

    def remove(self, path: str, recursive: bool = True) -> None:
        raise Unsupported(f"remove is not supported by this substrate (sandbox {self.sandbox_id})")

    def chown(self, path: str, uid: int, gid: int) -> None:
        raise Unsupported(f"chown is not supported by this substrate (sandbox {self.sandbox_id})")

    def watch_dir(self, path: str, recursive: bool = False) -> DirWatch:
        """Start watching; returns once the watch is armed, so a change made after it returns is reported."""
        raise Unsupported(f"directory watches are not supported by this substrate (sandbox {self.sandbox_id})")

    def oom_kill_count(self) -> int:
        """How many processes the kernel OOM-killed in this sandbox so far (-1 if unknown)."""
        return -1

    def memory_limit_mb(self) -> int:
        return 0

    def usage(self) -> Usage:
        """CPU, memory and disk use now (see `Usage`)."""
        raise Unsupported(f"resource metrics are not supported by this substrate (sandbox {self.sandbox_id})")

    def check_pause(self, kind: PauseKind) -> None:
        """Raise Unsupported, naming why, if this sandbox cannot pause `kind`-wise (models.PauseKind); called
        before the server touches anything, so a refused memory pause can fall back to a freeze."""
        raise Unsupported(f"pause is not supported by this substrate (sandbox {self.sandbox_id})")

    def keeps_streams(self, kind: PauseKind) -> bool:
        """Whether the host's agent connection (sessions, process streams) lives through a `kind` pause; where
        it does not, the server ends its sessions first."""
        return kind == "freeze"

    def pause(self, kind: PauseKind = "freeze") -> None:
        """freeze: stop processes in place; memory: save processes + memory to disk, holding no CPU or RAM;
        files: end processes, keep files. `resume` undoes whichever it was."""
        raise Unsupported(f"pause is not supported by this substrate (sandbox {self.sandbox_id})")

    def resume(self) -> None:
        raise Unsupported(f"resume is not supported by this substrate (sandbox {self.sandbox_id})")

    def snapshot(self, dest: Path) -> str:
        """Write a restorable snapshot into `dest`; return its kind (e.g. 'filesystem', 'memory+disk')."""
        raise Unsupported(f"snapshot is not supported by this substrate (sandbox {self.sandbox_id})")

    def fork_snapshot(self, dest: Path) -> str:
        """The snapshot a fork starts from; a substrate that can also carry running processes overrides it."""
        return self.snapshot(dest)

    def call(self, payload: bytes, timeout_s: float, memory_mb: int) -> dict:
        """Run one cloudpickled call in a warm Python worker (capability `call`, the function substrate); returns
        the worker's reply (base64 result, error type and traceback, output). Why a capability: the Call RPC asks
        the registry, not a class, which sandboxes can take it."""
        raise Unsupported(f"call is not supported by this substrate (sandbox {self.sandbox_id}); use substrate='function'")

    def writable_layer(self) -> Path:
        """The directory holding everything this sandbox wrote over its image, as overlayfs keeps an upper dir
        (whiteouts as character devices, opaque dirs by xattr). Why: an image build's RUN step turns it into a
        layer (images/build.py); substrates whose changes live inside a disk image cannot offer it."""
        raise Unsupported(f"exporting the writable layer is not supported by this substrate (sandbox {self.sandbox_id})")

    def netns_path(self) -> Path:
        """The network namespace the sandbox's processes use (e.g. /proc/<init pid>/ns/net).

        Why: the port service opens TCP connections to ports inside the sandbox from the host by creating the
        socket in this namespace; a substrate whose network is not a host namespace (a VM) cannot offer one.
        """
        raise Unsupported(
            f"reaching ports inside sandbox {self.sandbox_id} is not supported by this substrate; "
            "use a container or function sandbox"
        )


class SandboxDriver(abc.ABC):
    """Creates and destroys sandboxes of one substrate with one runtime."""

    name: ClassVar[str]
    substrate: ClassVar[str]

    @abc.abstractmethod
    def create(self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, state_dir: Path) -> DriverSandbox:
        """Start a sandbox whose private state (mounts, sockets, writable layer) lives under `state_dir`."""

    @abc.abstractmethod
    def destroy(self, sandbox: DriverSandbox) -> None:
        """Kill every process and remove mounts, cgroups and the writable layer. Idempotent."""

    @abc.abstractmethod
    def cleanup_state_dir(self, state_dir: Path) -> None:
        """Clean what a dead server left in `state_dir` (used after kill -9); must not need a live object."""

    def stop(self, sandbox: DriverSandbox) -> bool:
        """End the sandbox's processes now, without waiting for the rest of its teardown: True when nothing of it
        runs any more and `destroy` may follow later (off the caller's path); False (the default) when `destroy`
        must run now. Why: a destroy's unmounts and waits need not hold up its caller once the sandbox is dead."""
        return False

    def restore(self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, snapshot: Path, state_dir: Path) -> DriverSandbox:
        raise Unsupported(f"restore is not supported by the {self.name} driver")

    def adopt(self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, state_dir: Path, paused: bool) -> DriverSandbox:
        """Re-attach a live sandbox a dead server left in `state_dir` (server/readopt.py): a new handle from its
        records, after probing it is healthy (raises a DsecError if not). `paused`: it was paused, and stays so.
        Unsupported where the substrate's sandboxes do not outlive their server; the caller then reaps it."""
        raise Unsupported(f"the {self.name} driver cannot re-attach sandbox {sandbox_id} after a server restart")


__all__ = [
    "DirWatch", "DriverSandbox", "Exited", "FsEvent", "ImageConfig", "ImageRootfs", "Output", "ProcessEvent",
    "ProcessHandle", "SandboxDriver", "Usage", "snapshot_target_full", "volume_source",
]
