"""Read and remove a sandbox's cgroups on a cgroup v1 (or hybrid) host, without the runtime's help.

The runtime creates the cgroups from config.json; dsec reads them directly (OOM kills, limits) because asking
the runtime costs a process start, and removes them itself on destroy because a runtime killed halfway, or a
crashed server, leaves them behind: after destroy nothing of the sandbox may remain in any hierarchy.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from dsec.errors import RuntimeFailure

CGROUP_FS_TYPES = ("cgroup", "cgroup2")
REMOVE_TIMEOUT_S = 30.0
_controller_mounts: dict[str, Path] = {}  # controller_mount()'s memory


def hierarchies() -> list[tuple[Path, str]]:
    """(mount point, controllers) of every mounted cgroup hierarchy, e.g. (/sys/fs/cgroup/memory, 'memory')."""
    found: list[tuple[Path, str]] = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split(" ")
            if len(fields) >= 4 and fields[2] in CGROUP_FS_TYPES:
                options = fields[3].split(",")
                controllers = [o for o in options if o not in ("rw", "ro", "nosuid", "nodev", "noexec", "relatime")]
                found.append((Path(fields[1]), ",".join(controllers) if fields[2] == "cgroup" else "unified"))
    return found


def controller_mount(controller: str) -> Path | None:
    """The mount point of the hierarchy holding `controller` (None if none is mounted). Remembered, because
    every exec asks (OOM kills before and after, the memory limit) and parsing the mount table each time costs
    0.2 ms with 40 mounts and grows with every sandbox's overlay and disk; a remembered mount that is no longer
    a mount point is looked up again."""
    mount = _controller_mounts.get(controller)
    if mount is not None and os.path.ismount(mount):
        return mount
    found = next((m for m, controllers in hierarchies() if controller in controllers.split(",")), None)
    if found is not None:
        _controller_mounts[controller] = found
    return found


def controller_dir(controller: str, path: str) -> Path | None:
    """The directory of cgroup `path` in the hierarchy holding `controller` (None if none is mounted)."""
    mount = controller_mount(controller)
    return mount / path.lstrip("/") if mount is not None else None


def existing_dirs(path: str) -> list[Path]:
    """Every directory of cgroup `path` (and of cgroups nested in it), deepest first, across all hierarchies."""
    dirs: list[Path] = []
    for mount, _ in hierarchies():
        top = mount / path.lstrip("/")
        if top.is_dir():
            nested = [Path(root) for root, _, _ in os.walk(top)]
            dirs.extend(sorted(nested, key=lambda p: len(p.parts), reverse=True))
    return dirs


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def oom_kill_count(path: str) -> int:
    """How many processes the kernel OOM-killed in cgroup `path` (cgroup v1 `memory.oom_control`); -1 if unknown."""
    directory = controller_dir("memory", path)
    if directory is None:
        return -1
    for line in _read(directory / "memory.oom_control").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return -1


def memory_file(path: str, name: str) -> str | None:
    """The path of file `name` of cgroup `path` in the memory hierarchy (None if none is mounted)."""
    directory = controller_dir("memory", path)
    return str(directory / name) if directory is not None else None


class OomKillFile:
    """An `oom_kill N` counter file (cgroup v1 `memory.oom_control`, v2 `memory.events`) kept open and re-read
    with pread: every exec reads it twice (before and after), and open + read + close on cgroupfs cost ~15 us where
    a pread costs ~2 (this host). A cgroup removed and made again (resume, restore) leaves the file dead: `read` is
    then -1 and the owner opens a new one. The descriptor is closed with the object, never under a reader."""

    def __init__(self, candidates: Iterable[str | Path]) -> None:
        """Open the first of `candidates` that opens (none: every `read` is -1)."""
        self._fd = -1
        for file in candidates:
            try:
                self._fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
                return
            except OSError:
                continue

    def read(self) -> int:
        """The `oom_kill` count; -1 if the file is gone or unreadable."""
        if self._fd < 0:
            return -1
        try:
            data = os.pread(self._fd, 4096, 0)
        except OSError:
            return -1
        for line in data.split(b"\n"):
            field, _, value = line.partition(b" ")
            if field == b"oom_kill":
                return int(value)
        return -1

    def __del__(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class OomCounter(OomKillFile):
    """The OOM kill counter of cgroup `cgroup` (a crun/runc sandbox's path) in the memory hierarchy."""

    def __init__(self, cgroup: str) -> None:
        self.cgroup = cgroup
        file = memory_file(cgroup, "memory.oom_control")
        super().__init__([] if file is None else [file])


def memory_limit_bytes(path: str) -> int:
    """The memory limit of cgroup `path` in bytes (0 if unknown)."""
    directory = controller_dir("memory", path)
    text = _read(directory / "memory.limit_in_bytes").strip() if directory else ""
    return int(text) if text else 0


def cpu_usage_ns(path: str) -> int:
    """CPU time used by cgroup `path` so far, in nanoseconds (cpuacct.usage; 0 if unknown)."""
    directory = controller_dir("cpuacct", path)
    text = _read(directory / "cpuacct.usage").strip() if directory else ""
    return int(text) if text.isdigit() else 0


def memory_usage(path: str) -> tuple[int, int]:
    """(bytes used, of which page cache) of cgroup `path` (memory.usage_in_bytes, memory.stat); (0, 0) if unknown."""
    directory = controller_dir("memory", path)
    if directory is None:
        return 0, 0
    used = _read(directory / "memory.usage_in_bytes").strip()
    cache = 0
    for line in _read(directory / "memory.stat").splitlines():
        key, _, value = line.partition(" ")
        if key == "total_cache" and value.strip().isdigit():
            cache = int(value)
    return (int(used) if used.isdigit() else 0), cache


def cpu_quota(path: str) -> tuple[int, int]:
    """(cfs_quota_us, cfs_period_us) of cgroup `path`; quota -1 means unlimited, (0, 0) unknown."""
    directory = controller_dir("cpu", path)
    if directory is None:
        return 0, 0
    quota, period = _read(directory / "cpu.cfs_quota_us").strip(), _read(directory / "cpu.cfs_period_us").strip()
    return (int(quota), int(period)) if quota and period else (0, 0)


def pids_limit(path: str) -> int:
    """pids.max of cgroup `path` (-1 for unlimited or unknown)."""
    directory = controller_dir("pids", path)
    text = _read(directory / "pids.max").strip() if directory else ""
    return int(text) if text.isdigit() else -1


def is_frozen(path: str) -> bool:
    """Whether cgroup `path` is frozen (paused) or freezing."""
    directory = controller_dir("freezer", path)
    state = _read(directory / "freezer.state").strip() if directory else ""
    return state in ("FROZEN", "FREEZING")


def _thaw_dir(directory: Path) -> None:
    freezer = directory / "freezer.state"
    if freezer.exists() and _read(freezer).strip() != "THAWED":
        try:
            freezer.write_text("THAWED")
        except OSError:
            pass


def thaw(path: str) -> None:
    """Thaw cgroup `path` if frozen: a frozen process cannot die, so destroy thaws before it kills."""
    directory = controller_dir("freezer", path)
    if directory is not None:
        _thaw_dir(directory)


def _kill_members(directory: Path) -> None:
    _thaw_dir(directory)
    for pid in _read(directory / "cgroup.procs").split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove(path: str, sandbox_id: str = "", timeout_s: float = REMOVE_TIMEOUT_S) -> None:
    """Kill whatever still runs in cgroup `path` and remove it from every hierarchy. Already gone is fine."""
    deadline = time.monotonic() + timeout_s
    for directory in existing_dirs(path):
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise RuntimeFailure(f"removing cgroup {directory} of sandbox {sandbox_id} failed: {exc}") from exc
                if time.monotonic() > deadline:
                    raise RuntimeFailure(
                        f"cgroup {directory} of sandbox {sandbox_id} still has processes after {timeout_s:.0f}s: "
                        "they are stuck in the kernel (D state); retry the destroy later",
                        sandbox_id=sandbox_id,
                    ) from exc
                _kill_members(directory)
                time.sleep(0.01)
