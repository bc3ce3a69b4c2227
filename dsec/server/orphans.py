"""Find and remove what dsec sandboxes left on this host when no live server owns them any more.

Why next to the run-dir reaper (state.py): the reaper tears down what a dead server's records describe; a
sandbox whose records are lost (a crash between creating its cgroup and writing its record, a state
directory removed by hand) is invisible to it, while its cgroups, processes, loop device, QEMU or Docker
container live on. This sweep starts from the host's side instead: every `/dsec/<id>` cgroup, every loop
device backed by a `…/<id>/disk.img`, every QEMU whose pidfile is `…/<id>/qemu.pid`, every container
labelled `dsec.sandbox=<id>`.

Ownership must hold across several servers with different `$DSEC_HOME`s on one machine, so before a server
creates anything for a sandbox it registers it machine-wide: `/run/dsec/sandboxes/<id>` is a symlink to the
sandbox's state directory, whose parent is the owning server's run directory with its `server.lock`. The
owner is alive exactly while some process holds that flock, which `/proc/locks` tells without touching the
lock (taking it, even briefly, could make a concurrent reaper skip a dead server). A resource is removed only
when it is registered and its owner is dead: what cannot be attributed (a driver used without a server, a
sandbox of another tool) is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors

from dsec.errors import RuntimeFailure
from dsec.server.state import unmount_below
from dsec.substrates.container import cgroups
from dsec.substrates.container.bundle import CGROUP_PARENT
from dsec.substrates.container.dockerd import DSEC_DOCKER_SOCKET, ping
from dsec.substrates.container.rootfs import unmount

log = logging.getLogger("dsec.server.orphans")

REGISTRY = Path("/run/dsec/sandboxes")
SANDBOX_ID = re.compile(r"sb-[0-9a-f]{16}")
LOCK_NAME = "server.lock"
DISK_IMAGE = "disk.img"
QEMU_PIDFILE = "qemu.pid"
OCI_RUNTIMES = ("crun", "runc")
LOOP_CLR_FD = 0x4C01
KILL_WAIT_S = 10.0
LOOP_DETACH_WAIT_S = 10.0  # a killed container's mount namespace (holding its disk) is freed asynchronously


def register(sandbox_id: str, sandbox_dir: Path) -> None:
    """Record machine-wide that `sandbox_dir`'s server owns `sandbox_id`; called before any of it exists."""
    REGISTRY.mkdir(parents=True, exist_ok=True)
    tmp = REGISTRY / f".{sandbox_id}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(sandbox_dir.resolve())
    os.replace(tmp, REGISTRY / sandbox_id)


def unregister(sandbox_id: str) -> None:
    """Forget `sandbox_id` once nothing of it is left on the host."""
    (REGISTRY / sandbox_id).unlink(missing_ok=True)


def registered_dir(sandbox_id: str) -> Path | None:
    """The state directory `sandbox_id` was registered with, None if it is not registered."""
    try:
        return Path(os.readlink(REGISTRY / sandbox_id))
    except OSError:
        return None


def _held_locks() -> set[tuple[int, int, int]]:
    """(major, minor, inode) of every file some process holds a lock on."""
    held: set[tuple[int, int, int]] = set()
    with open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            if len(fields) < 6 or fields[1] == "->":  # "->" marks a waiter, not a holder
                continue
            try:
                major, minor, inode = fields[5].split(":")
                held.add((int(major, 16), int(minor, 16), int(inode)))
            except ValueError:
                continue
    return held


def owner_alive(sandbox_dir: Path, held: set[tuple[int, int, int]] | None = None) -> bool:
    """Whether the server whose run directory holds `sandbox_dir` is alive (holds its `server.lock`)."""
    try:
        st = os.stat(sandbox_dir.parent / LOCK_NAME)
    except FileNotFoundError:
        return False  # a run directory without lock: its server is gone (clean exit or never fully started)
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in (held if held is not None else _held_locks())


@dataclass
class Orphans:
    """What the sweep found (and removed) for sandboxes whose owner is dead."""

    cgroups: list[str] = field(default_factory=list)  # sandbox ids with a /dsec/<id> cgroup
    loops: list[str] = field(default_factory=list)  # /dev/loopN backed by a sandbox's disk image
    qemus: list[int] = field(default_factory=list)  # QEMU pids
    containers: list[str] = field(default_factory=list)  # Docker container ids
    registrations: list[str] = field(default_factory=list)  # registry entries dropped

    def __bool__(self) -> bool:
        return bool(self.cgroups or self.loops or self.qemus or self.containers)


def _cgroup_ids() -> set[str]:
    found: set[str] = set()
    for mount, _ in cgroups.hierarchies():
        parent = mount / CGROUP_PARENT
        with contextlib.suppress(OSError):
            found.update(p.name for p in parent.iterdir() if p.is_dir() and SANDBOX_ID.fullmatch(p.name))
    return found


def _loops() -> dict[str, Path]:
    """/dev/loopN -> backing file, for loop devices backed by a sandbox disk image."""
    found: dict[str, Path] = {}
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            path = Path(backing.read_text().strip().removesuffix(" (deleted)"))
            if path.name == DISK_IMAGE and SANDBOX_ID.fullmatch(path.parent.name):
                found[f"/dev/{backing.parent.parent.name}"] = path
    return found


def _qemus() -> dict[int, Path]:
    """QEMU pid -> its state directory (from `-pidfile <dir>/qemu.pid`)."""
    found: dict[int, Path] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or b"qemu-system" not in argv[0]:
            continue
        for flag, value in zip(argv, argv[1:]):
            if flag == b"-pidfile" and value.endswith(f"/{QEMU_PIDFILE}".encode()):
                found[int(proc.name)] = Path(value.decode(errors="replace")).parent
    return found


def _docker_containers() -> dict[str, str]:
    """Container id -> sandbox id, from dsec's own engine if it is running (never started for this)."""
    base_url = f"unix://{DSEC_DOCKER_SOCKET}"
    if not ping(base_url):
        return {}
    client = docker.APIClient(base_url=base_url, version="auto", timeout=60)
    try:
        listed = client.containers(all=True, filters={"label": "dsec.sandbox"})
        return {c["Id"]: c["Labels"].get("dsec.sandbox", "") for c in listed}
    finally:
        client.close()


def _remove_container(container: str) -> None:
    client = docker.APIClient(base_url=f"unix://{DSEC_DOCKER_SOCKET}", version="auto", timeout=120)
    try:
        client.remove_container(container, force=True, v=True)
    except docker.errors.NotFound:
        pass
    finally:
        client.close()


def _kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)


def _mounts_of(device: str) -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            before, _, after = line.partition(" - ")
            source = after.split(" ")[1] if after.count(" ") >= 1 else ""
            if source == device:
                points.append(before.split(" ")[4].encode().decode("unicode_escape"))
    return points


def _detach_loop(device: str) -> None:
    """Unmount the loop device everywhere in this namespace, then detach it (autoclear ones go by themselves)."""
    for point in sorted(_mounts_of(device), key=len, reverse=True):
        unmount(Path(point))
    deadline = time.monotonic() + LOOP_DETACH_WAIT_S
    name = device.removeprefix("/dev/")
    while Path(f"/sys/block/{name}/loop/backing_file").exists():
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, LOOP_CLR_FD)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENXIO, errno.ENOENT):
                raise RuntimeFailure(f"detaching orphaned {device} failed: {exc}") from exc
        if time.monotonic() > deadline:
            raise RuntimeFailure(f"orphaned {device} is still attached after {LOOP_DETACH_WAIT_S:.0f}s: something holds it")
        time.sleep(0.05)


def _clean_state(sandbox_id: str, sandbox_dir: Path) -> None:
    """Drop the dead sandbox's leftovers on disk: mounts under its state dir, the dir, its OCI runtime state."""
    unmount_below(sandbox_dir)
    shutil.rmtree(sandbox_dir, ignore_errors=True)
    home = sandbox_dir.parent.parent.parent  # <home>/run/<server>/<sandbox>
    for runtime in OCI_RUNTIMES:
        shutil.rmtree(home / "oci" / runtime / sandbox_id, ignore_errors=True)


def sweep() -> Orphans:
    """Remove everything of every registered sandbox whose server is dead; returns what was removed.

    Safe while other servers run: their sandboxes are registered to run directories whose lock they hold.
    Processes go first (cgroup members, QEMUs, containers), then cgroups, loop devices and mounts.
    """
    held = _held_locks()
    dead: dict[str, Path] = {}

    def dead_dir(sandbox_id: str, expected: Path | None = None) -> Path | None:
        if sandbox_id not in dead:
            registered = registered_dir(sandbox_id)
            if registered is None or owner_alive(registered, held):
                return None
            dead[sandbox_id] = registered
        if expected is not None and expected.resolve() != dead[sandbox_id]:
            return None  # another sandbox dir of the same id name: not the registered one
        return dead[sandbox_id]

    removed = Orphans()
    for container, sandbox_id in _docker_containers().items():
        if dead_dir(sandbox_id) is not None:
            _remove_container(container)
            removed.containers.append(container)
    for pid, state_dir in _qemus().items():
        if dead_dir(state_dir.name, state_dir) is not None:
            _kill_pid(pid)
            removed.qemus.append(pid)
    for sandbox_id in sorted(_cgroup_ids()):
        if dead_dir(sandbox_id) is not None:
            cgroups.remove(f"/{CGROUP_PARENT}/{sandbox_id}", sandbox_id)
            removed.cgroups.append(sandbox_id)
    for device, backing in _loops().items():
        if dead_dir(backing.parent.name, backing.parent) is not None:
            _clean_state(backing.parent.name, backing.parent)
            _detach_loop(device)
            removed.loops.append(device)
    for entry in list(REGISTRY.iterdir()) if REGISTRY.is_dir() else []:
        if SANDBOX_ID.fullmatch(entry.name) and dead_dir(entry.name) is not None:
            _clean_state(entry.name, dead[entry.name])
            unregister(entry.name)
            removed.registrations.append(entry.name)
    if removed:
        log.warning(
            "removed orphans of dead servers: cgroups %s, loops %s, qemu pids %s, containers %s",
            removed.cgroups, removed.loops, removed.qemus, [c[:12] for c in removed.containers],
        )  # fmt: skip
    return removed
