"""What container sandboxes can leave on a host, found from the host's side and removed for the orphan sweep.

The sweep (dsec/server/orphans.py) owns the judgement (`ctx.gone`: is this id's owner dead, or are its records
lost?); this module only knows where container leftovers live: Docker containers labelled `dsec.sandbox=<id>`,
`/dsec/<id>` cgroups (and crun/runc's state for the id), `/run/netns/dsec-<id>`, `inet dsec_<id>` nftables tables,
`dsh<slot>` veths and their slot files, and loop devices backed by a `…/<id>/disk.img`. The network plumbing is
shared with allowlisted VMs (dsec/substrates/vm/net.py), so the vm substrates list `NETWORK` too.
"""

from __future__ import annotations

import contextlib
import logging
import errno
import fcntl
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import docker
import docker.errors

from dsec.errors import RuntimeFailure
from dsec.substrates.container import cgroups, spares, volatile
from dsec.substrates.container.bundle import CGROUP_PARENT
from dsec.substrates.container.dockerd import DSEC_DOCKER_SOCKET, ping
from dsec.substrates.container.network import ALLOC_DIR, NETNS_DIR, Link, netns_name, release_slot, table_name
from dsec.substrates.container.rootfs import mounts_under, unmount
from dsec.substrates.registry import SANDBOX_ID, SweepContext, Sweeper

log = logging.getLogger("dsec.substrates.container.sweep")

NETNS_NAME = re.compile(rf"dsec-({SANDBOX_ID.pattern})")
NFT_TABLE = re.compile(r"table inet (dsec_sb_[0-9a-f]{16})")
VETH_NAME = re.compile(r"dsh(\d+)")
COMMAND_TIMEOUT_S = 30.0
DISK_IMAGE = "disk.img"
OCI_RUNTIMES = ("crun", "runc")
LOOP_CLR_FD = 0x4C01
LOOP_DETACH_WAIT_S = 10.0  # a killed container's mount namespace (holding its disk) is freed asynchronously


def _command(argv: list[str], missing_ok: bool = True) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeFailure(f"orphan sweep: `{' '.join(argv)}` hung for {COMMAND_TIMEOUT_S:.0f}s") from exc
    err = proc.stderr.strip()
    missing = any(s in err for s in ("No such file", "Cannot find device", "No such device", "does not exist"))
    if proc.returncode != 0 and not (missing_ok and missing):
        raise RuntimeFailure(f"orphan sweep: `{' '.join(argv)}` failed: {err[-800:]}")


class DockerContainers(Sweeper):
    """Containers of dsec's own Docker engine, if it is running (never started for this)."""

    stage = 0
    kinds = ("containers",)

    def sweep(self, ctx: SweepContext) -> None:
        for container, sandbox_id in self._listed().items():
            if ctx.gone(sandbox_id):
                ctx.remove(sandbox_id, "containers", container, lambda c=container: self._remove(c))

    @staticmethod
    def _listed() -> dict[str, str]:
        """Container id -> sandbox id."""
        base_url = f"unix://{DSEC_DOCKER_SOCKET}"
        if not ping(base_url):
            return {}
        client = docker.APIClient(base_url=base_url, version="auto", timeout=60)
        try:
            listed = client.containers(all=True, filters={"label": "dsec.sandbox"})
            return {c["Id"]: c["Labels"].get("dsec.sandbox", "") for c in listed}
        finally:
            client.close()

    @staticmethod
    def _remove(container: str) -> None:
        client = docker.APIClient(base_url=f"unix://{DSEC_DOCKER_SOCKET}", version="auto", timeout=120)
        try:
            client.remove_container(container, force=True, v=True)
        except docker.errors.NotFound:
            pass
        finally:
            client.close()


class Cgroups(Sweeper):
    """crun/runc containers: every `/dsec/<id>` cgroup (removing it kills its members), and the runtimes' state."""

    stage = 10
    kinds = ("cgroups",)

    def sweep(self, ctx: SweepContext) -> None:
        for sandbox_id in sorted(self.ids()):
            remove = lambda i=sandbox_id: cgroups.remove(f"/{CGROUP_PARENT}/{i}", i)  # noqa: E731
            if ctx.gone(sandbox_id):
                ctx.remove(sandbox_id, "cgroups", sandbox_id, remove)

    @staticmethod
    def ids() -> set[str]:
        """The sandbox ids with a `/dsec/<id>` cgroup in any hierarchy: those whose processes may still run."""
        found: set[str] = set()
        for mount, _ in cgroups.hierarchies():
            parent = mount / CGROUP_PARENT
            with contextlib.suppress(OSError):
                found.update(p.name for p in parent.iterdir() if p.is_dir() and SANDBOX_ID.fullmatch(p.name))
        return found

    def clean_state(self, sandbox_id: str, state_dir: Path) -> None:
        """The runtimes' state for the id (on the home's tmpfs, or under the home for older servers' sandboxes)
        and its short-lived files (volatile.py), mount points included."""
        home = state_dir.parent.parent.parent  # <home>/run/<server>/<sandbox>
        for runtime in OCI_RUNTIMES:
            shutil.rmtree(home / "oci" / runtime / sandbox_id, ignore_errors=True)
            shutil.rmtree(volatile.runtime_root(home, runtime) / sandbox_id, ignore_errors=True)
        files = volatile.sandbox_dir(home, sandbox_id)
        for mount_point in mounts_under(files):
            unmount(mount_point)
        if not mounts_under(files):
            shutil.rmtree(files, ignore_errors=True)


class Network(Sweeper):
    """Per-sandbox network plumbing (network.py): nftables tables, named netns, veths and their slots."""

    stage = 20
    kinds = ("nft_tables", "netns", "veths", "slots")

    def sweep(self, ctx: SweepContext) -> None:
        for table, sandbox_id in self._nft_tables().items():
            delete = lambda t=table: _command(["nft", "delete", "table", "inet", t])  # noqa: E731
            if ctx.gone(sandbox_id) and table == table_name(sandbox_id):
                ctx.remove(sandbox_id, "nft_tables", table, delete)
        for name, sandbox_id in self._netns().items():
            delete = lambda n=name: _command(["ip", "netns", "delete", n])  # noqa: E731 - its veth peer goes with it
            if ctx.gone(sandbox_id) and name == netns_name(sandbox_id):
                ctx.remove(sandbox_id, "netns", name, delete)
        for slot, sandbox_id in self._slot_owners().items():
            if not ctx.gone(sandbox_id):
                continue
            # The slot still names the dead sandbox, and only a sweep (one at a time) releases a dead sandbox's slot:
            # the `dsh<slot>` link is its own, not a live sandbox's that claimed the slot since.
            host_if = Link(slot).host_if
            if Path(f"/sys/class/net/{host_if}").exists() and self._slot_owner(slot) == sandbox_id:
                delete = lambda h=host_if: _command(["ip", "link", "delete", h])  # noqa: E731
                if not ctx.remove(sandbox_id, "veths", host_if, delete):
                    continue  # keep the slot: its link still exists
            release_slot(slot, sandbox_id)
            ctx.record("slots", slot)
        for claim in ALLOC_DIR.glob(".claim-*") if ALLOC_DIR.is_dir() else ():
            if ctx.gone(claim.name.removeprefix(".claim-")):
                claim.unlink(missing_ok=True)

    @staticmethod
    def _netns() -> dict[str, str]:
        """Named netns -> sandbox id, for the `dsec-<id>` ones (allowlisted containers and VMs)."""
        found: dict[str, str] = {}
        for entry in NETNS_DIR.iterdir() if NETNS_DIR.is_dir() else ():
            if match := NETNS_NAME.fullmatch(entry.name):
                found[entry.name] = match.group(1)
        return found

    @staticmethod
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

    @staticmethod
    def _slot_owners() -> dict[int, str]:
        """Network slot -> the sandbox id its claim file names."""
        found: dict[int, str] = {}
        for path in ALLOC_DIR.iterdir() if ALLOC_DIR.is_dir() else ():
            if path.name.isdigit():
                with contextlib.suppress(OSError):
                    found[int(path.name)] = path.read_text()
        return found

    @staticmethod
    def _slot_owner(slot: int) -> str | None:
        try:
            return (ALLOC_DIR / str(slot)).read_text()
        except OSError:
            return None


class Disks(Sweeper):
    """Loop devices backed by a sandbox's `disk.img` (its ext4 disk = `disk_mb`), with the mounts on them."""

    stage = 30
    kinds = ("loops",)

    def sweep(self, ctx: SweepContext) -> None:
        # one wait for the whole pass, not one per device: a device something still holds stays for the next
        # start's sweep, and N stuck devices must not hold this server's start (and the sweep lock) N times over
        deadline = time.monotonic() + LOOP_DETACH_WAIT_S
        for device, backing in self._loops().items():
            sandbox_id = backing.parent.name
            if not ctx.gone(sandbox_id, backing.parent):
                continue
            known = ctx.dead_dir(sandbox_id)

            def detach(device: str = device, backing: Path = backing, known: Path | None = known) -> None:
                if known is not None:
                    ctx.clean_state(backing.parent.name, known)
                self._detach(device, backing, deadline)

            ctx.remove(sandbox_id, "loops", device, detach)

    @staticmethod
    def _loops() -> dict[str, Path]:
        """/dev/loopN -> backing file, for loop devices backed by a sandbox disk image."""
        found: dict[str, Path] = {}
        for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
            with contextlib.suppress(OSError):
                path = Path(backing.read_text().strip().removesuffix(" (deleted)"))
                if path.name == DISK_IMAGE and SANDBOX_ID.fullmatch(path.parent.name):
                    found[f"/dev/{backing.parent.parent.name}"] = path
        return found

    @staticmethod
    def _mounts_of(device: str) -> list[str]:
        points = []
        with open("/proc/self/mountinfo") as mountinfo:
            for line in mountinfo:
                before, _, after = line.partition(" - ")
                source = after.split(" ")[1] if after.count(" ") >= 1 else ""
                if source == device:
                    points.append(before.split(" ")[4].encode().decode("unicode_escape"))
        return points

    @staticmethod
    def _backing(device: str) -> str | None:
        try:
            text = Path(f"/sys/block/{device.removeprefix('/dev/')}/loop/backing_file").read_text()
            return text.strip().removesuffix(" (deleted)")
        except OSError:
            return None

    def _detach(self, device: str, backing: Path, deadline: float) -> None:
        """Unmount the loop device everywhere in this namespace, then detach it (autoclear ones go by themselves).

        Each step re-reads the device's backing file: once the orphan's processes are killed its autoclear device
        may detach by itself and be reused by a live sandbox, whose disk must not be unmounted."""
        if self._backing(device) != str(backing):
            return
        for point in sorted(self._mounts_of(device), key=len, reverse=True):
            if self._backing(device) != str(backing):
                return
            unmount(Path(point))
        while self._backing(device) == str(backing):
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
                    f"orphaned {device} is still attached after this sweep's {LOOP_DETACH_WAIT_S:.0f}s: something "
                    "holds it; the next server start tries again"
                )
            time.sleep(0.05)


DOCKER = DockerContainers()
CGROUPS = Cgroups()
NETWORK = Network()
DISKS = Disks()


class SpareDisks(Sweeper):
    """Spare disks (spares.py) of dead processes of any home: mounted, loop-backed, owned by no sandbox."""

    stage = 30
    kinds = ("spare_disks",)

    def sweep(self, ctx: SweepContext) -> None:
        try:
            for owner in spares.reap_dead_owners_on_host():
                ctx.record("spare_disks", owner)
        except (OSError, RuntimeFailure) as exc:  # the next start retries; a sweep never fails a server's start
            log.warning("spare disks of dead processes not all removed (the next start retries): %s", exc)
SPARE_DISKS = SpareDisks()


class VolatileHomes(Sweeper):
    """The tmpfs directories (volatile.py) of homes that no longer exist: after the cgroups and disks, so every
    sandbox of a dead owner is gone and unmounted first. Not reported as an orphan kind: a home's directory is
    no sandbox's leftover, and a sweep that found only these found no orphan."""

    stage = 40

    def sweep(self, ctx: SweepContext) -> None:
        try:
            for root in volatile.sweep_deleted_homes(Cgroups.ids()):
                log.info("removed %s: the runtime files' directory of a home that no longer exists", root)
        except OSError as exc:  # the next start retries; a sweep never fails a server's start
            log.warning("directories of removed homes not all swept (the next start retries): %s", exc)
VOLATILE_HOMES = VolatileHomes()
