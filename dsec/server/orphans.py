"""Find and remove what dsec sandboxes left on this host when no live server owns them any more.

Why next to the run-dir reaper (state.py): the reaper tears down what a dead server's records describe; a
sandbox whose records are lost (a crash between creating its cgroup and writing its record, a state
directory removed by hand) is invisible to it, while its cgroups, processes, loop device, netns, veth, nftables
table, QEMU or Docker container live on. This sweep starts from the host's side instead: every `/dsec/<id>`
cgroup, every loop device backed by a `…/<id>/disk.img`, every `/run/netns/dsec-<id>`, every `inet dsec_<id>`
nftables table, every `dsh<slot>` veth (its owner is the id in its slot file), every QEMU whose pidfile is
`…/<id>/qemu.pid`, every container labelled `dsec.sandbox=<id>`.

Ownership must hold across several servers with different `$DSEC_HOME`s on one machine, so before a server
creates anything for a sandbox it registers it machine-wide: `/run/dsec/sandboxes/<id>` is a symlink to the
sandbox's state directory, whose parent is the owning server's run directory with its `server.lock`. The
owner is alive exactly while some process holds that flock, which `/proc/locks` tells without touching the
lock (taking it, even briefly, could make a concurrent reaper skip a dead server).

The ownership mark is the name: `sb-<16 hex>` ids are made only by servers (`SandboxManager._new_id`), which
register an id before creating anything for it and unregister it only after all of it is gone. So a resource
named for such an id is removed when its registration points at a dead server, and also when it has no
registration at all (its records are lost: nothing live can own it). Other names (a driver used without a
server: tests' `ct-…`, image builds' `build-…`) cannot be attributed and are never touched, nor is a resource
whose state directory sits in a live server's run directory. Sweeps take a machine-wide lock, so two servers
starting together never race over a loop device or a network slot one of them just freed.

Snapshots (`sweep_snapshots`) carry their own mark: `SnapshotStore` creates each snapshot directory with an
`owner` link to its server's run directory (and a `temporary` file for a fork's own snapshot); a snapshot never
published, or a temporary one, whose owner is dead is removed. Published snapshots are the users' and stay.
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
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors

from dsec.errors import RuntimeFailure
from dsec.server.state import unmount_below
from dsec.substrates.container import cgroups
from dsec.substrates.container.bundle import CGROUP_PARENT
from dsec.substrates.container.dockerd import DSEC_DOCKER_SOCKET, ping
from dsec.substrates.container.network import ALLOC_DIR, NETNS_DIR, Link, netns_name, release_slot, table_name
from dsec.substrates.container.rootfs import unmount

log = logging.getLogger("dsec.server.orphans")

REGISTRY = Path("/run/dsec/sandboxes")
SWEEP_LOCK = Path("/run/dsec/sweep.lock")
SANDBOX_ID = re.compile(r"sb-[0-9a-f]{16}")  # the server's id scheme (SandboxManager._new_id): the ownership mark
NETNS_NAME = re.compile(r"dsec-(sb-[0-9a-f]{16})")
NFT_TABLE = re.compile(r"table inet (dsec_sb_[0-9a-f]{16})")
VETH_NAME = re.compile(r"dsh(\d+)")
SNAPSHOT_OWNER = "owner"  # in a snapshot dir: symlink to the run directory of the server that made it
SNAPSHOT_TEMPORARY = "temporary"  # in a snapshot dir: the snapshot is a fork's own, deleted once the fork is done
SNAPSHOT_META = "meta.json"
COMMAND_TIMEOUT_S = 30.0
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


def run_dir_alive(run_dir: Path, held: set[tuple[int, int, int]] | None = None) -> bool:
    """Whether the server of `run_dir` is alive (some process holds its `server.lock`)."""
    try:
        st = os.stat(run_dir / LOCK_NAME)
    except OSError:
        return False  # a run directory without lock: its server is gone (clean exit or never fully started)
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in (held if held is not None else _held_locks())


def owner_alive(sandbox_dir: Path, held: set[tuple[int, int, int]] | None = None) -> bool:
    """Whether the server whose run directory holds `sandbox_dir` is alive (holds its `server.lock`)."""
    return run_dir_alive(sandbox_dir.parent, held)


@dataclass
class Orphans:
    """What the sweep found (and removed) for sandboxes whose owner is dead."""

    cgroups: list[str] = field(default_factory=list)  # sandbox ids with a /dsec/<id> cgroup
    loops: list[str] = field(default_factory=list)  # /dev/loopN backed by a sandbox's disk image
    qemus: list[int] = field(default_factory=list)  # QEMU pids
    containers: list[str] = field(default_factory=list)  # Docker container ids
    netns: list[str] = field(default_factory=list)  # /run/netns names
    veths: list[str] = field(default_factory=list)  # host ends (dsh<slot>)
    slots: list[int] = field(default_factory=list)  # network slots released
    nft_tables: list[str] = field(default_factory=list)  # inet tables
    registrations: list[str] = field(default_factory=list)  # registry entries dropped
    unrecorded: list[str] = field(default_factory=list)  # sandbox ids found with no registration at all
    failures: list[str] = field(default_factory=list)  # removals that failed (retried at the next start)

    def __bool__(self) -> bool:
        return bool(self.cgroups or self.loops or self.qemus or self.containers or self.netns or self.veths
                    or self.slots or self.nft_tables)


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


def _netns() -> dict[str, str]:
    """Named netns -> sandbox id, for the `dsec-<id>` ones (allowlisted containers and VMs)."""
    found: dict[str, str] = {}
    for entry in NETNS_DIR.iterdir() if NETNS_DIR.is_dir() else ():
        if match := NETNS_NAME.fullmatch(entry.name):
            found[entry.name] = match.group(1)
    return found


def _nft_tables() -> dict[str, str]:
    """`inet dsec_<id>` nftables table -> sandbox id ({} when nft is not installed)."""
    try:
        listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found: dict[str, str] = {}
    for line in listed.stdout.splitlines():
        if match := NFT_TABLE.fullmatch(line.strip()):
            found[match.group(1)] = "sb-" + match.group(1).removeprefix("dsec_sb_")
    return found


def _slot_owners() -> dict[int, str]:
    """Network slot -> the sandbox id its claim file names."""
    found: dict[int, str] = {}
    for path in ALLOC_DIR.iterdir() if ALLOC_DIR.is_dir() else ():
        if path.name.isdigit():
            with contextlib.suppress(OSError):
                found[int(path.name)] = path.read_text()
    return found


def _veth_slots() -> list[int]:
    """Slots whose host-side veth end (`dsh<slot>`) exists in this network namespace."""
    return sorted(int(m.group(1)) for p in Path("/sys/class/net").iterdir() if (m := VETH_NAME.fullmatch(p.name)))


def _slot_owner(slot: int) -> str | None:
    try:
        return (ALLOC_DIR / str(slot)).read_text()
    except OSError:
        return None


def _command(argv: list[str], missing_ok: bool = True) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeFailure(f"orphan sweep: `{' '.join(argv)}` hung for {COMMAND_TIMEOUT_S:.0f}s") from exc
    err = proc.stderr.strip()
    missing = any(s in err for s in ("No such file", "Cannot find device", "No such device", "does not exist"))
    if proc.returncode != 0 and not (missing_ok and missing):
        raise RuntimeFailure(f"orphan sweep: `{' '.join(argv)}` failed: {err[-800:]}")


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


def _backing(device: str) -> str | None:
    try:
        text = Path(f"/sys/block/{device.removeprefix('/dev/')}/loop/backing_file").read_text()
        return text.strip().removesuffix(" (deleted)")
    except OSError:
        return None


def _detach_loop(device: str, backing: Path) -> None:
    """Unmount the loop device everywhere in this namespace, then detach it (autoclear ones go by themselves).

    Each step re-reads the device's backing file: once the orphan's processes are killed its autoclear device
    may detach by itself and be reused by a live sandbox, whose disk must not be unmounted."""
    if _backing(device) != str(backing):
        return
    for point in sorted(_mounts_of(device), key=len, reverse=True):
        if _backing(device) != str(backing):
            return
        unmount(Path(point))
    deadline = time.monotonic() + LOOP_DETACH_WAIT_S
    while _backing(device) == str(backing):
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
            raise RuntimeFailure(
                f"orphaned {device} is still attached after {LOOP_DETACH_WAIT_S:.0f}s: something holds it"
            )
        time.sleep(0.05)


def _clean_state(sandbox_id: str, sandbox_dir: Path) -> None:
    """Drop the dead sandbox's leftovers on disk: mounts under its state dir, the dir, its OCI runtime state."""
    unmount_below(sandbox_dir)
    shutil.rmtree(sandbox_dir, ignore_errors=True)
    home = sandbox_dir.parent.parent.parent  # <home>/run/<server>/<sandbox>
    for runtime in OCI_RUNTIMES:
        shutil.rmtree(home / "oci" / runtime / sandbox_id, ignore_errors=True)


@dataclass
class _Owners:
    """Who owns each sandbox id the sweep meets, decided once per id from one reading of /proc/locks."""

    held: set[tuple[int, int, int]]
    dead: dict[str, Path | None] = field(default_factory=dict)  # id -> its state dir (None: not known)
    unrecorded: set[str] = field(default_factory=set)

    def gone(self, sandbox_id: str, expected: Path | None = None) -> bool:
        """Whether `sandbox_id`'s resources are an orphan's: registered to a dead server, or a server's id with no
        registration at all. `expected`: the state dir the resource itself names (loop backing, QEMU pidfile)."""
        registered = registered_dir(sandbox_id)
        if registered is not None:
            if owner_alive(registered, self.held):
                return False
            if expected is not None and expected.resolve() != registered:
                return False  # another sandbox dir of the same id name: not the registered one
            self.dead.setdefault(sandbox_id, registered)
            return True
        if not SANDBOX_ID.fullmatch(sandbox_id):
            return False  # not a server's id: a driver used without a server, or another tool's; never ours to judge
        if expected is not None and owner_alive(expected, self.held):
            return False  # in a live server's run dir: its owner is removing it right now
        self.unrecorded.add(sandbox_id)
        known = expected if expected is not None and (expected.parent / LOCK_NAME).exists() else None
        if self.dead.get(sandbox_id) is None:
            self.dead[sandbox_id] = known  # only a dead server's run dir is ours to delete
        return True


@contextlib.contextmanager
def _exclusive() -> Iterator[None]:
    """One sweep at a time on this machine: two would race over devices and slots the other just freed."""
    SWEEP_LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(SWEEP_LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def sweep() -> Orphans:
    """Remove everything of every sandbox whose server is dead or whose records are lost; returns what went.

    Safe while other servers run: their sandboxes are registered to run directories whose lock they hold.
    Processes go first (containers, QEMUs, cgroup members), then network plumbing (netns, veths, slots,
    nftables tables), then loop devices and mounts, then the registrations.
    """
    with _exclusive():
        removed = _sweep(_Owners(_held_locks()))
    for failure in removed.failures:
        log.error("orphan sweep: removing %s failed; the next server start retries", failure)
    if removed:
        log.warning(
            "removed orphans of dead servers: cgroups %s, loops %s, qemu pids %s, containers %s, netns %s, veths %s, "
            "slots %s, nft tables %s; without any record: %s",
            removed.cgroups, removed.loops, removed.qemus, [c[:12] for c in removed.containers], removed.netns,
            removed.veths, removed.slots, removed.nft_tables, removed.unrecorded,
        )  # fmt: skip
    return removed


def _sweep(owners: _Owners) -> Orphans:
    removed = Orphans()
    failed: set[str] = set()  # ids with a removal that failed: they stay registered, so the next start retries

    def attempt(sandbox_id: str, what: str, action: Callable[[], None]) -> bool:
        """One removal; a failure is logged and skips only this resource, never the rest of the sweep."""
        try:
            action()
            return True
        except Exception as exc:  # noqa: BLE001 - recorded and retried at the next start
            failed.add(sandbox_id)
            removed.failures.append(f"{what} of {sandbox_id}: {exc}")
            return False

    for container, sandbox_id in _docker_containers().items():
        if owners.gone(sandbox_id) and attempt(sandbox_id, "container", lambda c=container: _remove_container(c)):
            removed.containers.append(container)
    for pid, state_dir in _qemus().items():
        if owners.gone(state_dir.name, state_dir) and attempt(state_dir.name, "qemu", lambda p=pid: _kill_pid(p)):
            removed.qemus.append(pid)
    for sandbox_id in sorted(_cgroup_ids()):
        remove = lambda i=sandbox_id: cgroups.remove(f"/{CGROUP_PARENT}/{i}", i)  # noqa: E731
        if owners.gone(sandbox_id) and attempt(sandbox_id, "cgroup", remove):
            removed.cgroups.append(sandbox_id)
    for table, sandbox_id in _nft_tables().items():
        delete = lambda t=table: _command(["nft", "delete", "table", "inet", t])  # noqa: E731
        if owners.gone(sandbox_id) and table == table_name(sandbox_id) and attempt(sandbox_id, "nft table", delete):
            removed.nft_tables.append(table)
    for name, sandbox_id in _netns().items():
        delete = lambda n=name: _command(["ip", "netns", "delete", n])  # noqa: E731 - its veth peer goes with it
        if owners.gone(sandbox_id) and name == netns_name(sandbox_id) and attempt(sandbox_id, "netns", delete):
            removed.netns.append(name)
    for slot, sandbox_id in _slot_owners().items():
        if not owners.gone(sandbox_id):
            continue
        # The slot still names the dead sandbox, and only a sweep (one at a time) releases a dead sandbox's slot:
        # the `dsh<slot>` link is its own, not a live sandbox's that claimed the slot since.
        host_if = Link(slot).host_if
        if Path(f"/sys/class/net/{host_if}").exists() and _slot_owner(slot) == sandbox_id:
            if not attempt(sandbox_id, "veth", lambda h=host_if: _command(["ip", "link", "delete", h])):
                continue  # keep the slot: its link still exists
            removed.veths.append(host_if)
        release_slot(slot, sandbox_id)
        removed.slots.append(slot)
    for device, backing in _loops().items():
        sandbox_id = backing.parent.name
        if not owners.gone(sandbox_id, backing.parent):
            continue
        known = owners.dead.get(sandbox_id)

        def detach(device: str = device, backing: Path = backing, known: Path | None = known) -> None:
            if known is not None:
                _clean_state(backing.parent.name, known)
            _detach_loop(device, backing)

        if attempt(sandbox_id, f"loop device {device}", detach):
            removed.loops.append(device)
    for claim in ALLOC_DIR.glob(".claim-*") if ALLOC_DIR.is_dir() else ():
        if owners.gone(claim.name.removeprefix(".claim-")):
            claim.unlink(missing_ok=True)
    for entry in list(REGISTRY.iterdir()) if REGISTRY.is_dir() else []:
        if SANDBOX_ID.fullmatch(entry.name) and entry.name not in failed and owners.gone(entry.name):
            known = owners.dead.get(entry.name)
            if known is not None:
                _clean_state(entry.name, known)
            unregister(entry.name)
            removed.registrations.append(entry.name)
    removed.unrecorded = sorted(owners.unrecorded)
    return removed


def sweep_snapshots(root: Path) -> list[str]:
    """Remove snapshot leftovers of dead servers under `root`: never-published (half-written) snapshot dirs and
    a fork's temporary snapshot, whose `owner` mark names a run directory nobody holds; returns their names.

    A published snapshot without the `temporary` mark is a user's and stays, whoever made it. A `snap-*` dir with
    neither `meta.json` nor an owner mark is a half-deleted one (delete drops `meta.json` first) or one from
    before owner marks: nothing writes into it any more. A staging dir (`.new-snap-*`) without its mark yet is
    left alone: its server may be between creating it and marking it.
    """
    removed: list[str] = []
    if not root.is_dir():
        return removed
    held = _held_locks()
    for entry in sorted(root.iterdir()):
        staging = entry.name.startswith(".new-snap-")
        if not entry.is_dir() or not (staging or entry.name.startswith("snap-")):
            continue
        try:
            owner: Path | None = Path(os.readlink(entry / SNAPSHOT_OWNER))
        except OSError:
            owner = None
        published = (entry / SNAPSHOT_META).exists()
        temporary = (entry / SNAPSHOT_TEMPORARY).exists()
        if owner is not None and run_dir_alive(owner, held):
            continue
        if owner is None and (staging or published):
            continue  # cannot be attributed: a staging dir being marked, or a published snapshot of old
        if published and not temporary:
            continue
        (entry / SNAPSHOT_META).unlink(missing_ok=True)  # invisible first, as SnapshotStore deletes
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    if removed:
        log.warning("removed snapshot leftovers of dead servers: %s", removed)
    return removed
