"""The orphan sweep: a sandbox whose records are lost is still removed once its server is dead, and a live
server's sandboxes are never touched by another server's sweep."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest

import dsec
from dsec.server import orphans
from dsec.server.state import SANDBOX_RECORD
from dsec.substrates.container import cgroups
from dsec.substrates.container.dockerd import DSEC_DOCKER_SOCKET, ping
from dsec.substrates.container.record import RECORD_NAME

from .probe import sandbox_ids_of_server
from .rounds import start_server

SETTLE_S = 15.0


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _host_traces(sandbox_id: str, pids: list[int]) -> list[str]:
    """Everything of `sandbox_id` on the host: cgroups, loop devices, mounts, its former processes, registration."""
    found = [f"cgroup {d}" for d in cgroups.existing_dirs(f"/dsec/{sandbox_id}")]
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if sandbox_id in backing.read_text():
                found.append(f"loop {backing.parent.parent.name}")
        except OSError:
            continue
    found += [f"mount {line.split()[1]}" for line in Path("/proc/self/mounts").read_text().splitlines() if sandbox_id in line]
    found += [f"process {pid}" for pid in pids if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    if orphans.registered_dir(sandbox_id) is not None:
        found.append("registry entry")
    return found + _containers(sandbox_id)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def _settled(sandbox_id: str, pids: list[int]) -> list[str]:
    deadline = time.monotonic() + SETTLE_S
    while (left := _host_traces(sandbox_id, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _pids_running(command: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().replace(b"\0", b" ").strip() == command.encode():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _containers(sandbox_id: str) -> list[str]:
    if not ping(f"unix://{DSEC_DOCKER_SOCKET}"):
        return []
    client = docker.APIClient(base_url=f"unix://{DSEC_DOCKER_SOCKET}", version="auto", timeout=60)
    try:
        return [f"container {c['Id'][:12]}" for c in client.containers(all=True, filters={"label": f"dsec.sandbox={sandbox_id}"})]
    finally:
        client.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("driver", ["crun", "docker"])
def test_sandbox_without_records_is_swept_after_its_server_is_killed(driver):
    home = Path(os.environ["DSEC_HOME"])
    process, address = start_server(home, driver)
    successor = None
    sandbox_id, pids = "", []
    try:
        client = dsec.Client(address)
        sandbox = client.create("busybox", "container", driver=driver, memory_mb=64, disk_mb=64, timeout_s=120)
        sandbox_id = sandbox.id
        marker = f"sleep {100_000 + int.from_bytes(os.urandom(3), 'big')}"
        sandbox.exec(f"{marker} >/dev/null 2>&1 &")
        client.close()
        pids = _pids_running(marker)
        assert pids, "the sandbox's background process is not visible on the host"
        run_dir, ids = sandbox_ids_of_server(home, process.pid)
        assert run_dir is not None and ids == [sandbox_id]
        # the crash this models: the sandbox exists on the host, the run directory no longer describes it
        for record in (SANDBOX_RECORD, RECORD_NAME):
            (run_dir / sandbox_id / record).unlink(missing_ok=True)
        process.send_signal(signal.SIGKILL)
        process.wait()
        before = _host_traces(sandbox_id, pids)
        assert any(t.startswith(("cgroup", "container")) for t in before), before
        assert any(t.startswith("loop") for t in before), before
        assert any(t.startswith("process") for t in before), f"the sandbox's processes died with the server: {before}"
        successor, _ = start_server(home, driver)  # it reaps and sweeps before it reports ready
        assert _settled(sandbox_id, pids) == []
        assert not (run_dir / sandbox_id).exists()
    finally:
        _stop(process)
        if successor is not None:
            _stop(successor)
        orphans.sweep()  # a failed assertion above must not leave the leak behind for other tests


@pytest.mark.timeout(300)
def test_a_live_servers_sandboxes_survive_other_servers_sweeps():
    home = Path(os.environ["DSEC_HOME"])
    first, first_address = start_server(home, "crun")
    second = third = None
    clients: list[dsec.Client] = []
    try:
        second, second_address = start_server(home, "crun")
        clients = [dsec.Client(first_address), dsec.Client(second_address)]
        sandboxes = [c.create("busybox", memory_mb=64, timeout_s=120) for c in clients]
        for sandbox in sandboxes:
            sandbox.exec("echo kept > /mark")
        traces = {s.id: _host_traces(s.id, []) for s in sandboxes}
        third, _ = start_server(home, "crun")  # a third server's start-up sweep
        swept = orphans.sweep()  # and one from a process that is not a server at all
        assert not {s.id for s in sandboxes} & (set(swept.cgroups) | set(swept.registrations))
        for sandbox in sandboxes:
            assert sandbox.exec("cat /mark").text == "kept\n"
            assert _host_traces(sandbox.id, []) == traces[sandbox.id]
        for sandbox in sandboxes:
            sandbox.destroy()
            # settled: the kernel frees a killed container's mount namespace, and with it the loop device, after
            # destroy returns
            assert _settled(sandbox.id, []) == [], "destroy must also drop the registration"
    finally:
        for client in clients:
            client.close()
        for process in (first, second, third):
            if process is not None:
                _stop(process)


def test_owner_is_alive_exactly_while_its_lock_is_held(tmp_path):
    sandbox_dir = tmp_path / "run" / "server1" / "sb-0123456789abcdef"
    sandbox_dir.mkdir(parents=True)
    assert not orphans.owner_alive(sandbox_dir), "no lock file: no live owner"
    fd = os.open(sandbox_dir.parent / "server.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        assert not orphans.owner_alive(sandbox_dir)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert orphans.owner_alive(sandbox_dir)
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert not orphans.owner_alive(sandbox_dir)
    finally:
        os.close(fd)


def test_a_half_written_registration_goes_only_with_its_dead_server(tmp_path):
    """`register` links `.<id>.<pid>.tmp`, then renames it; a server killed in between leaves the link behind. The
    sweep removes it once the server whose run dir it names is dead, and never while that server lives."""
    run_dir = tmp_path / "run" / "server1"
    run_dir.mkdir(parents=True)
    fd = os.open(run_dir / "server.lock", os.O_CREAT | os.O_RDWR, 0o600)
    orphans.REGISTRY.mkdir(parents=True, exist_ok=True)
    half = orphans.REGISTRY / f".sb-{os.urandom(8).hex()}.424242.tmp"
    half.symlink_to(run_dir / "sb-0123456789abcdef")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert half.name not in orphans.sweep().registrations and half.is_symlink(), "its server is alive"
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert half.name in orphans.sweep().registrations and not half.is_symlink()
    finally:
        os.close(fd)
        half.unlink(missing_ok=True)


def test_cgroups_of_ids_no_server_makes_are_never_touched():
    """A /dsec/<id> cgroup whose id is not a server's (`sb-<16 hex>`), e.g. a driver used without a server, is not
    the sweep's to remove, registered or not. (Unregistered server ids: tests/recovery/test_sweep_unrecorded.py.)"""
    sandbox_id = "ct-" + os.urandom(6).hex()
    made = []
    try:
        for mount, controllers in cgroups.hierarchies():
            if "pids" in controllers.split(","):
                directory = mount / "dsec" / sandbox_id
                directory.mkdir(parents=True)
                made.append(directory)
        assert made
        assert sandbox_id not in orphans.sweep().cgroups
        assert all(d.is_dir() for d in made)
    finally:
        for directory in made:
            directory.rmdir()


def _dead_registered_sandbox(tmp_path: Path) -> tuple[str, Path]:
    """A registered sandbox dir in a run directory whose server is dead (lock file present, nobody holds it)."""
    sandbox_id = "sb-" + os.urandom(8).hex()
    sandbox_dir = tmp_path / "run" / "deadserver" / sandbox_id
    sandbox_dir.mkdir(parents=True)
    (sandbox_dir.parent / "server.lock").write_text("0")
    orphans.register(sandbox_id, sandbox_dir)
    return sandbox_id, sandbox_dir


@pytest.mark.timeout(60)
def test_a_dead_servers_qemu_and_loop_device_are_swept(tmp_path):
    """The sweep's QEMU and loop paths on real kernel objects: a process named like QEMU with the sandbox's pidfile,
    and a loop device (not auto-clearing) backed by the sandbox's disk image."""
    sandbox_id, sandbox_dir = _dead_registered_sandbox(tmp_path)
    (sandbox_dir / "disk.img").write_bytes(b"\0" * (1 << 20))
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-c", "import time; time.sleep(600)", "-pidfile", str(sandbox_dir / "qemu.pid")],
        executable=sys.executable,
    )
    device = subprocess.run(
        ["losetup", "--find", "--show", str(sandbox_dir / "disk.img")], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        swept = orphans.sweep()
        qemu.wait(timeout=15)  # the sweep reaped it already (it is our child): the exit status is lost, not the kill
        assert not Path(f"/proc/{qemu.pid}").exists()
        assert qemu.pid in swept.qemus and device in swept.loops and sandbox_id in swept.registrations
        try:  # detached; its number may be taken at once by another attach (spare disks of live servers, tests)
            backing = Path(f"/sys/block/{device.removeprefix('/dev/')}/loop/backing_file").read_text().strip()
        except OSError:
            backing = ""
        assert backing.removesuffix(" (deleted)") != str(sandbox_dir / "disk.img")
        assert orphans.registered_dir(sandbox_id) is None and not sandbox_dir.exists()
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
        orphans.unregister(sandbox_id)


def test_only_live_unexpired_sandboxes_of_other_homes_wait_for_their_home(tmp_path):
    """`_Owners.awaits_its_home`: the sweep spares a dead server's sandbox only when it lives under another home's
    run root, was handed to a client (`live`) and has not expired; no home given spares nothing."""
    import json
    import time

    from dsec.server.state import SANDBOX_RECORD

    now = time.time()
    home_a, home_b = tmp_path / "a" / "run", tmp_path / "b" / "run"

    def sandbox_dir(live: bool, expires_at: float) -> Path:
        path = home_a / "server1" / f"sb-{os.urandom(8).hex()}"
        path.mkdir(parents=True)
        (path / SANDBOX_RECORD).write_text(json.dumps({"live": live, "expires_at": expires_at}))
        return path

    other = orphans._Owners(set(), home_b, now)
    assert other.awaits_its_home(sandbox_dir(True, now + 60))
    assert not other.awaits_its_home(sandbox_dir(True, now - 1)), "expired: anyone reaps it"
    assert not other.awaits_its_home(sandbox_dir(False, now + 60)), "pooled or mid-create: never re-adopted"
    assert not other.awaits_its_home(home_a / "server1" / "sb-0000000000000000"), "no record: nothing to re-adopt"
    assert not orphans._Owners(set(), home_a, now).awaits_its_home(sandbox_dir(True, now + 60)), "its own home"
    assert not orphans._Owners(set(), None, now).awaits_its_home(sandbox_dir(True, now + 60))
