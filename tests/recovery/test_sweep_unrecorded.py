"""Leftovers that lost every record (no registration, no run-dir record) are found from the host's side and removed
by the next server's start; a live server's sandbox (cgroups, disk loop device, netns, veth, nftables table) and
resources that cannot be attributed to a server are untouched.

Each kind of leftover is made by hand, as a crash would leave it: a `/dsec/<id>` cgroup with a process in it, a
loop device on a `<id>/disk.img`, a `dsec-<id>` netns with a veth into it, a host veth whose slot names the id, an
`inet dsec_<id>` nftables table, a QEMU-named process with the id's pidfile. Snapshot leftovers (a half-written
snapshot, a fork's temporary one) carry an owner mark; a dead owner's go, a live owner's and published ones stay.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dsec
from dsec.server import orphans
from dsec.server.snapshots import SnapshotStore
from dsec.substrates.container import cgroups, network

from .rounds import start_server

HOME = Path(os.environ.get("DSEC_HOME", "/var/lib/dsec"))


def _stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _sh(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True).stdout.strip()


def _new_id() -> str:
    return "sb-" + secrets.token_hex(8)


def _links() -> set[str]:
    return {p.name for p in Path("/sys/class/net").iterdir()}


def _tables() -> set[str]:
    return set(_sh("nft", "list", "tables").splitlines())


def _netns_names() -> set[str]:
    return {p.name for p in network.NETNS_DIR.iterdir()} if network.NETNS_DIR.is_dir() else set()


def _traces(sandbox_id: str) -> list[str]:
    """Everything named for `sandbox_id` on the host."""
    found = [f"cgroup {d}" for d in cgroups.existing_dirs(f"/dsec/{sandbox_id}")]
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if sandbox_id in backing.read_text():
                found.append(f"loop {backing.parent.parent.name}")
        except OSError:
            continue
    found += [f"netns {n}" for n in _netns_names() if n == network.netns_name(sandbox_id)]
    found += [f"nft {t}" for t in _tables() if t == f"table inet {network.table_name(sandbox_id)}"]
    found += [f"slot {s}" for s in network.slots_of(sandbox_id)]
    found += [f"veth {network.Link(s).host_if}" for s in network.slots_of(sandbox_id) if network.Link(s).host_if in _links()]
    return found


class Leftovers:
    """Host resources of one sandbox id, made by hand with no registration and no records."""

    def __init__(self, root: Path, sandbox_id: str | None = None) -> None:
        self.id = sandbox_id or _new_id()
        self.dir = root / "run" / f"dead{secrets.token_hex(3)}" / self.id
        self.dir.mkdir(parents=True)
        (self.dir.parent / "server.lock").write_text("0")  # a run dir whose server is gone (nobody holds the lock)
        self.cgroup_dirs: list[Path] = []
        self.pids: list[int] = []
        self.device = ""
        self.slots: list[int] = []

    def cgroup_with_a_process(self) -> None:
        sleeper = subprocess.Popen(["sleep", "600"])
        self.pids.append(sleeper.pid)
        self._children = [sleeper]
        for mount, controllers in cgroups.hierarchies():
            if any(c in controllers.split(",") for c in ("pids", "memory")):
                directory = mount / "dsec" / self.id
                directory.mkdir(parents=True, exist_ok=True)
                (directory / "cgroup.procs").write_text(str(sleeper.pid))
                self.cgroup_dirs.append(directory)

    def loop_device(self) -> None:
        image = self.dir / "disk.img"
        image.write_bytes(b"\0" * (1 << 20))
        self.device = _sh("losetup", "--find", "--show", str(image))

    def netns_and_veths(self) -> None:
        """The allowlist plumbing: netns with a veth into it (slot claimed), and a second host-only veth pair."""
        name = network.netns_name(self.id)
        _sh("ip", "netns", "add", name)
        for index in range(2):
            slot = network.allocate_slot(self.id)
            self.slots.append(slot)
            link = network.Link(slot)
            peer = ["netns", name] if index == 0 else []
            _sh("ip", "link", "add", link.host_if, "type", "veth", "peer", "name", link.peer_if, *peer)

    def nft_table(self) -> None:
        table = network.table_name(self.id)
        subprocess.run(
            ["nft", "-f", "-"], input=f"table inet {table} {{\n chain input {{ type filter hook input priority 0; }}\n}}\n",
            text=True, check=True, capture_output=True,
        )  # fmt: skip

    def qemu(self) -> None:
        process = subprocess.Popen(
            ["qemu-system-x86_64", "-c", "import time; time.sleep(600)", "-pidfile", str(self.dir / "qemu.pid")],
            executable=sys.executable,
        )
        self.pids.append(process.pid)
        self._children = [*getattr(self, "_children", []), process]

    def alive_pids(self) -> list[int]:
        for child in getattr(self, "_children", []):
            child.poll()  # reap: a killed child of ours is a zombie until waited for
        return [pid for pid in self.pids if Path(f"/proc/{pid}").exists()]

    def remove(self) -> None:
        """Test cleanup, whatever the sweep did."""
        for child in getattr(self, "_children", []):
            if child.poll() is None:
                child.kill()
                child.wait()
        if self.device:
            subprocess.run(["losetup", "-d", self.device], capture_output=True, check=False)
        subprocess.run(["nft", "delete", "table", "inet", network.table_name(self.id)], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "delete", network.netns_name(self.id)], capture_output=True, check=False)
        for slot in self.slots:
            subprocess.run(["ip", "link", "delete", network.Link(slot).host_if], capture_output=True, check=False)
            network.release_slot(slot, self.id)
        for directory in self.cgroup_dirs:
            if directory.is_dir():
                directory.rmdir()


@pytest.mark.timeout(300)
def test_leftovers_without_records_go_at_the_next_start_and_a_live_servers_stay(tmp_path):
    live, successor = None, None
    made = Leftovers(tmp_path)
    foreign = tmp_path / "foreign"  # a driver used without a server names its sandboxes otherwise: never ours
    foreign_cgroups: list[Path] = []
    try:
        live, address = start_server(HOME, "crun")
        client = dsec.Client(address)
        kept = client.create("busybox", memory_mb=64, disk_mb=64, network_allow=["10.9.9.9"], timeout_s=300)
        kept.exec("echo kept > /mark")
        kept_traces = _traces(kept.id)
        assert any(t.startswith("netns") for t in kept_traces) and any(t.startswith("nft") for t in kept_traces)
        assert any(t.startswith("veth") for t in kept_traces) and any(t.startswith("loop") for t in kept_traces)

        made.cgroup_with_a_process()
        made.loop_device()
        made.netns_and_veths()
        made.nft_table()
        made.qemu()
        for mount, controllers in cgroups.hierarchies():
            if "pids" in controllers.split(","):
                foreign_cgroups.append(mount / "dsec" / f"ct-{secrets.token_hex(6)}")
                foreign_cgroups[-1].mkdir(parents=True)
        foreign.mkdir()
        before = _traces(made.id)
        for kind in ("cgroup", "loop", "netns", "nft", "slot", "veth"):
            assert any(t.startswith(kind) for t in before), (kind, before)
        assert len(made.alive_pids()) == 2

        successor, _ = start_server(HOME, "crun")  # its start-up sweep runs before it reports ready

        assert _traces(made.id) == []
        deadline = time.monotonic() + 15
        while made.alive_pids() and time.monotonic() < deadline:
            time.sleep(0.05)  # SIGKILLed: gone as soon as the kernel has torn them down
        assert made.alive_pids() == []
        assert not made.dir.exists(), "a dead server's run dir of the sandbox is removed with its loop device"
        assert all(d.is_dir() for d in foreign_cgroups), "an id no server uses is never the sweep's"
        assert _traces(kept.id) == kept_traces
        assert kept.exec("cat /mark").text == "kept\n"
        kept.destroy()  # returns once it is killed; its teardown ends in the background (docs/lifecycle.md)
        deadline = time.monotonic() + 20
        while _traces(kept.id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _traces(kept.id) == []
        client.close()
    finally:
        made.remove()
        for directory in foreign_cgroups:
            if directory.is_dir():
                directory.rmdir()
        _stop(live)
        _stop(successor)


def test_sweep_reports_what_had_no_record(tmp_path):
    made = Leftovers(tmp_path)
    try:
        made.nft_table()
        swept = orphans.sweep()
        assert made.id in swept.unrecorded
        assert network.table_name(made.id) in swept.nft_tables
        assert _traces(made.id) == []
    finally:
        made.remove()


def test_a_live_run_dirs_unregistered_loop_is_left_to_its_owner(tmp_path):
    """An unregistered sandbox dir inside a live server's run dir is being destroyed by that server right now."""
    made = Leftovers(tmp_path)
    fd = os.open(made.dir.parent / "server.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        made.loop_device()
        assert made.device not in orphans.sweep().loops
        assert any(t.startswith("loop") for t in _traces(made.id))
    finally:
        os.close(fd)
        made.remove()


def _snapshot(root: Path, owner: Path | None, published: bool, temporary: bool = False) -> Path:
    directory = root / f"snap-{secrets.token_hex(8)}"
    (directory / "data").mkdir(parents=True)
    (directory / "data" / "layer.tar").write_bytes(b"x" * 4096)
    if owner is not None:
        (directory / orphans.SNAPSHOT_OWNER).symlink_to(owner)
    if temporary:
        (directory / orphans.SNAPSHOT_TEMPORARY).touch()
    if published:
        meta = {"snapshot_id": directory.name, "tenant": f"sweep-test-{secrets.token_hex(4)}", "created_at": time.time()}
        (directory / orphans.SNAPSHOT_META).write_text(json.dumps(meta))
    return directory


@pytest.mark.timeout(120)
def test_snapshot_leftovers_of_dead_servers_go_at_the_next_start(tmp_path):
    root = HOME / "snapshots"
    dead_run, live_run = tmp_path / "run" / "dead", tmp_path / "run" / "live"
    for run_dir in (dead_run, live_run):
        run_dir.mkdir(parents=True)
        (run_dir / "server.lock").write_text("0")
    fd = os.open(live_run / "server.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    successor = None
    made: list[Path] = []
    try:
        half_written = _snapshot(root, dead_run, published=False)
        fork_temporary = _snapshot(root, dead_run, published=True, temporary=True)
        half_deleted = _snapshot(root, None, published=False)
        users = _snapshot(root, dead_run, published=True)
        in_progress = _snapshot(root, live_run, published=False)
        live_fork = _snapshot(root, live_run, published=True, temporary=True)
        staging_dead = root / f".new-snap-{secrets.token_hex(8)}"
        staging_unmarked = root / f".new-snap-{secrets.token_hex(8)}"
        for staging in (staging_dead, staging_unmarked):
            staging.mkdir()
        (staging_dead / orphans.SNAPSHOT_OWNER).symlink_to(dead_run)
        made = [half_written, fork_temporary, half_deleted, users, in_progress, live_fork, staging_dead, staging_unmarked]
        successor, _ = start_server(HOME, "crun")
        assert not half_written.exists() and not fork_temporary.exists() and not half_deleted.exists()
        assert not staging_dead.exists()
        assert users.exists() and in_progress.exists() and live_fork.exists()
        assert staging_unmarked.exists(), "a staging dir not yet marked may be its live server's, between mkdir and mark"
    finally:
        os.close(fd)
        _stop(successor)
        for directory in made:
            (directory / orphans.SNAPSHOT_META).unlink(missing_ok=True)
            subprocess.run(["rm", "-rf", str(directory)], check=False)


def test_a_snapshot_dir_is_born_with_its_owner_mark(tmp_path):
    run_dir = tmp_path / "run" / "server"
    run_dir.mkdir(parents=True)
    store = SnapshotStore(tmp_path / "snapshots", owner=run_dir)
    kept, _ = store.new()
    fork_own, _ = store.new(temporary=True)
    for snapshot_id in (kept, fork_own):
        assert Path(os.readlink(tmp_path / "snapshots" / snapshot_id / orphans.SNAPSHOT_OWNER)) == run_dir.resolve()
    assert not (tmp_path / "snapshots" / kept / orphans.SNAPSHOT_TEMPORARY).exists()
    assert (tmp_path / "snapshots" / fork_own / orphans.SNAPSHOT_TEMPORARY).exists()
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == sorted([kept, fork_own]), "no staging dir left"


@pytest.mark.timeout(300)
def test_a_servers_fork_leaves_no_snapshot_and_a_user_snapshot_names_its_owner():
    server, address = start_server(HOME, "crun")
    try:
        with dsec.Client(address) as client:
            sandbox = client.create("busybox", memory_mb=64, timeout_s=300)
            snapshot_id = sandbox.snapshot("kept")
            directory = HOME / "snapshots" / snapshot_id
            owner = Path(os.readlink(directory / orphans.SNAPSHOT_OWNER))
            assert orphans.run_dir_alive(owner) and not (directory / orphans.SNAPSHOT_TEMPORARY).exists()
            for fork in sandbox.fork(1):
                fork.destroy()
            left = [d.name for d in (HOME / "snapshots").iterdir()
                    if (d / orphans.SNAPSHOT_OWNER).is_symlink() and Path(os.readlink(d / orphans.SNAPSHOT_OWNER)) == owner]
            assert left == [snapshot_id]
            client.delete_snapshot(snapshot_id)
            sandbox.destroy()
    finally:
        _stop(server)


def test_a_failed_removal_is_reported_and_does_not_stop_the_sweep(tmp_path):
    """A cgroup whose removal fails (here: a non-empty host dir bind-mounted over a child cgroup, so its rmdir
    fails) keeps its sandbox registered for the next start, while the rest of the sweep (another table) goes on."""
    stuck, other = Leftovers(tmp_path), Leftovers(tmp_path)
    pinned: list[Path] = []
    try:
        for mount, controllers in cgroups.hierarchies():
            if "pids" in controllers.split(","):
                child = mount / "dsec" / stuck.id / "pinned"
                child.mkdir(parents=True)
                stuck.cgroup_dirs[:0] = [child, child.parent]
                subprocess.run(["mount", "--bind", str(tmp_path), str(child)], check=True)  # rmdir: EBUSY
                pinned.append(child)
        orphans.register(stuck.id, stuck.dir)
        other.nft_table()
        swept = orphans.sweep()
        assert any(stuck.id in failure for failure in swept.failures), swept
        assert network.table_name(other.id) in swept.nft_tables
        assert orphans.registered_dir(stuck.id) is not None, "kept for the next start to retry"
    finally:
        for child in pinned:
            subprocess.run(["umount", str(child)], check=False)
        orphans.unregister(stuck.id)
        stuck.remove()
        other.remove()
