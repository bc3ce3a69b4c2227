"""Re-adopt, don't reap (issue #20 point 5): a server killed -9 in the middle of an exec and restarted on the same
home and port serves every healthy sandbox it left again — same id, labels, absolute expiry and files — to the
clients that held their ids; sessions and the exec in flight end (their processes belonged to the dead server's
agent connection), and the session id answers SessionNotFound. A sandbox that is not healthy is reaped; with
`--no-readopt` all are. Nothing leaks once the successor shuts down.

Servers are `dsec serve` child processes; every wait is on a protocol point (the ready line, an exec's first
output line, a process exit), never a sleep.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import docker
import grpc
import pytest

import dsec
from dsec.errors import DsecError, SandboxExpired, SandboxNotFound, SessionNotFound
from dsec.server.launch import READY_PREFIX
from dsec.substrates.container.docker_driver import SANDBOX_LABEL
from dsec.substrates.container.dockerd import DSEC_DOCKER_SOCKET
from dsec.substrates.container.record import ContainerRecord
from support.ports import free_port  # tests/ is on sys.path (rootdir-relative test packages)

from .probe import sandbox_ids_of_server, traces

HOME = Path(os.environ.get("DSEC_HOME", "/var/lib/dsec"))
START_TIMEOUT_S = 180.0  # a start re-adopts (probes) every sandbox before it is ready
CALL_TIMEOUT_S = 60.0
VMS = int(os.environ.get("DSEC_READOPT_TEST_VMS", "2"))  # microvms boot slowly here: keep them few


# A successor is started before its predecessor is killed, imports done, and released right after the kill: other
# tests' servers on this machine reap a dead server's sandboxes at their start, so the window between the kill and
# the take-over is kept to the successor's start-up proper.
HELD_LAUNCHER = """
import sys
import dsec.server.main as main
import dsec.images.store, dsec.substrates.container.driver, dsec.substrates.function.driver, dsec.substrates.vm.driver
print("DSEC_TEST_PRELOADED", flush=True)
sys.stdin.readline()
sys.exit(main.main(sys.argv[1:]))
"""


class Server:
    """`dsec serve` on a fixed port (a successor takes the same address, as an upgraded server would). With
    `held`, the process waits (imports done) until `go()`; otherwise it is started and ready on return."""

    def __init__(self, port: int, *extra: str, env: dict[str, str] | None = None, held: bool = False) -> None:
        self.address = f"127.0.0.1:{port}"
        log_dir = HOME / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log_dir / f"readopt-{os.getpid()}-{port}-{len(list(log_dir.glob('readopt-*')))}.log"
        args = ["--listen", self.address, "--home", str(HOME), "--container-driver", "crun", *extra]
        module = ["-c", HELD_LAUNCHER] if held else ["-m", "dsec.server.main"]
        command = [sys.executable, *module, *args]
        # DSEC_READOPT=1 is the product default; tests/conftest.py turns it off for the other tests' servers
        env = os.environ | {"DSEC_READOPT": "1"} | (env or {})
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.PIPE, env=env)
        self._preloaded, self._ready = threading.Event(), threading.Event()

        def read() -> None:
            assert self.process.stdout is not None
            for raw in self.process.stdout:
                line = raw.decode(errors="replace")
                if line.startswith("DSEC_TEST_PRELOADED"):
                    self._preloaded.set()
                if line.startswith(READY_PREFIX):
                    self._ready.set()

        threading.Thread(target=read, daemon=True).start()
        if held:
            self._wait(self._preloaded, "load")
        else:
            self._wait(self._ready, "get ready")

    def _wait(self, event: threading.Event, what: str) -> None:
        if not event.wait(START_TIMEOUT_S) or self.process.poll() is not None:
            self.process.kill()
            raise RuntimeError(f"dsec serve did not {what} in {START_TIMEOUT_S:.0f}s:\n{self.log.read_text()[-3000:]}")

    def go(self) -> Server:
        """Release a held server and wait until it is ready (it re-adopts before it reports ready)."""
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()
        self._wait(self._ready, "get ready")
        return self

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(120)


def wait_connected(client: dsec.Client) -> None:
    """The client's channel reconnects to the successor (its backoff after the kill may still be running)."""
    grpc.channel_ready_future(client.channel).result(timeout=CALL_TIMEOUT_S)


def kill_mid_exec(server: Server, sandbox: dsec.Sandbox) -> BaseException | None:
    """kill -9 the server once an exec has produced its first output line; returns what the exec raised."""
    first_line = threading.Event()
    outcome: dict[str, BaseException | None] = {"error": None}

    def run() -> None:
        try:
            sandbox.exec("echo started; sleep 600", on_stdout=lambda _chunk: first_line.set(), timeout=900)
        except BaseException as exc:  # noqa: BLE001 - the server dies under it: expected
            outcome["error"] = exc
        first_line.set()

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    assert first_line.wait(CALL_TIMEOUT_S), "the exec produced no output"
    server.kill9()
    runner.join(CALL_TIMEOUT_S)
    assert not runner.is_alive(), "the exec did not end when its server died"
    return outcome["error"]


def no_traces(ids: list[str]) -> list[str]:
    """What is left of `ids`, once settled: an ended id answers SandboxExpired as its teardown begins, and the kernel
    frees a killed container's mount namespace (its loop device) asynchronously."""
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while (left := traces(HOME, ids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def create_fleet(client: dsec.Client, containers: int, functions: int, vms: int) -> list[dsec.Sandbox]:
    fleet = []
    for i in range(containers):
        allow = ["10.0.0.0/8"] if i == containers - 1 else []  # one with its own netns, veth and nftables table
        labels = {"n": str(i), "kind": "crun"}
        fleet.append(client.create("busybox", labels=labels, timeout_s=1800, network_allow=allow))
    for i in range(functions):
        fleet.append(client.create("python", substrate="function", labels={"n": str(i), "kind": "function"},
                                   timeout_s=1800))
    for i in range(vms):
        fleet.append(client.create("busybox", substrate="microvm", labels={"n": str(i), "kind": "microvm"},
                                   timeout_s=1800))
    for sandbox in fleet:
        sandbox.files.write("/tmp/mark", f"{sandbox.id} was here\n")
    return fleet


def test_twenty_sandboxes_survive_a_kill9_mid_exec_and_nothing_leaks():
    port = free_port()
    server = Server(port)
    successor = None
    client = dsec.Client(server.address)
    ids: list[str] = []
    try:
        fleet = create_fleet(client, containers=20 - 4 - VMS, functions=4, vms=VMS)
        ids = [s.id for s in fleet]
        paused = [fleet[2]] + ([fleet[-1]] if VMS else [])  # a frozen container, a stopped VM: probed, kept paused
        for sandbox in paused:
            sandbox.pause()
        before = {s.id: s.refresh() for s in fleet}
        session = fleet[0].session()
        assert session.run("cd /tmp && X=41").exit_code == 0
        successor = Server(port, held=True)  # same home, same address
        error = kill_mid_exec(server, fleet[1])
        assert error is not None, "an exec whose server was killed must not report success"
        successor.go()
        wait_connected(client)
        for sandbox in paused:
            assert sandbox.refresh().state == "paused"
            sandbox.resume()
        for sandbox in fleet:
            info = sandbox.refresh()
            assert info.state == "running"
            earlier = before[sandbox.id]
            assert (dict(info.spec.labels), info.created_at) == (dict(earlier.spec.labels), earlier.created_at)
            assert info.expires_at == pytest.approx(earlier.expires_at, abs=0.01)
            assert sandbox.files.read_text("/tmp/mark") == f"{sandbox.id} was here\n"
            result = sandbox.exec("echo alive-$((40+2))")
            assert (result.exit_code, result.stdout.strip()) == (0, b"alive-42"), (sandbox.id, result)
        assert fleet[-4 - VMS].call(pow, 2, 10) == 1024  # a function sandbox's new worker
        with pytest.raises(SessionNotFound):
            session.run("echo $X")
        listed = {s.id for s in client.list(labels={})}
        assert set(ids) <= listed
    finally:
        for running in (successor, server):
            if running is not None:
                running.stop()
    assert no_traces(ids) == []
    assert [i for i in ids if (Path("/run/netns") / f"dsec-{i}").exists()] == []  # the allowlisted one's netns


def test_unhealthy_sandboxes_are_reaped_a_second_crash_is_survived_and_no_readopt_reaps_all():
    port = free_port()
    server = Server(port)
    client = dsec.Client(server.address)
    successor = None
    try:
        healthy, broken = client.create("busybox"), client.create("busybox")
        _kill_init(broken.id)  # its container dies: cgroup empty, agent gone
        successor = Server(port, held=True)
        server.kill9()
        successor.go()
        wait_connected(client)
        assert healthy.exec("true").exit_code == 0
        with pytest.raises(SandboxNotFound):
            broken.exec("true")
        assert no_traces([broken.id]) == []
        third = Server(port, held=True)
        successor.kill9()  # a second crash: the next server takes over the run dir the dead successor had adopted
        successor = third.go()
        wait_connected(client)
        assert healthy.exec("true").exit_code == 0
        fourth = Server(port, "--no-readopt", held=True)  # the old behaviour: a dead server's sandboxes are reaped
        successor.kill9()
        successor = fourth.go()
        wait_connected(client)
        with pytest.raises(SandboxNotFound):
            healthy.exec("true")
        assert no_traces([healthy.id, broken.id]) == []
    finally:
        for running in (successor, server):
            if running is not None:
                running.stop()


def test_docker_sandboxes_are_re_adopted():
    """The Docker driver's containers (dsec's own engine keeps them running) come back too, a paused one paused."""
    port = free_port()
    server = Server(port)
    client = dsec.Client(server.address)
    successor = None
    ids: list[str] = []
    try:
        running, paused = (client.create("busybox", driver="docker") for _ in range(2))
        ids = [running.id, paused.id]
        running.files.write("/tmp/mark", "docker\n")
        paused.pause()
        successor = Server(port, held=True)
        server.kill9()
        successor.go()
        wait_connected(client)
        assert running.files.read_text("/tmp/mark") == "docker\n"
        assert paused.refresh().state == "paused"
        paused.resume()
        assert [sb.exec("echo ok").stdout for sb in (running, paused)] == [b"ok\n", b"ok\n"]
    finally:
        for server_ in (successor, server):
            if server_ is not None:
                server_.stop()
    assert no_traces(ids) == []
    engine = docker.APIClient(base_url=f"unix://{DSEC_DOCKER_SOCKET}", version="auto")
    try:
        for sandbox_id in ids:
            assert engine.containers(all=True, filters={"label": f"{SANDBOX_LABEL}={sandbox_id}"}) == []
    finally:
        engine.close()


def _kill_init(sandbox_id: str) -> None:
    """SIGKILL the container's PID 1 (the agent) and wait for it to be gone."""
    state_dir = next((HOME / "run").glob(f"*/{sandbox_id}"))
    pid_file = ContainerRecord.read(state_dir).files_dir(state_dir) / "container.pid"
    pid = int(pid_file.read_text())
    pidfd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], CALL_TIMEOUT_S)
    finally:
        os.close(pidfd)




def test_pooled_expired_and_half_destroyed_sandboxes_are_not_brought_back():
    """Only what was live comes back: a pool's sandboxes (never handed out) are reaped; a sandbox whose destroy had
    started when the server died is finished (SandboxExpired, destroyed); one whose timeout passed while no server
    ran is ended before the successor serves any call (SandboxExpired, timeout), since its expiry is absolute."""
    port = free_port()
    server = Server(port, "--pool", "image=busybox,size=2", env={"DSEC_CRASH_AT": "destroy-after-intent"})
    client = dsec.Client(server.address)
    successor = None
    try:
        kept = client.create("busybox", timeout_s=600)
        doomed = client.create("busybox")
        pooled = _pooled_ids(server.process.pid, {kept.id, doomed.id}, want=2)
        successor = Server(port, held=True)  # no pool: the dead one's pooled sandboxes must not come back
        short = client.create("busybox", timeout_s=2)
        expiry = short.refresh().expires_at
        with pytest.raises(DsecError):
            doomed.destroy()  # the server SIGKILLs itself once the destroy intent is written
        server.process.wait(30)
        while time.time() <= expiry:  # the timeout passes while no server runs (wall clock, not machine speed)
            time.sleep(expiry - time.time() + 0.05)
        successor.go()
        wait_connected(client)
        assert kept.exec("true").exit_code == 0
        with pytest.raises(SandboxExpired) as destroyed:
            doomed.exec("true")
        assert destroyed.value.reason == "destroyed"
        with pytest.raises(SandboxExpired) as expired:  # ended before the successor served any call
            short.exec("true")
        assert expired.value.reason == "timeout"
        assert no_traces([*pooled, short.id, doomed.id]) == []
    finally:
        for running in (successor, server):
            if running is not None:
                running.stop()
    assert no_traces([kept.id, short.id, doomed.id, *pooled]) == []


def _pooled_ids(server_pid: int, live: set[str], want: int) -> list[str]:
    """The sandbox ids in the server's run dir that no client was given (its pool's), once `want` are ready."""
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while True:
        run_dir, ids = sandbox_ids_of_server(HOME, server_pid)
        pooled = [i for i in ids if i not in live and run_dir is not None and (run_dir / i / "sandbox.json").exists()]
        if len(pooled) >= want:
            return pooled
        assert time.monotonic() < deadline, f"the pool did not fill: {ids}"
        time.sleep(0.05)


def test_another_homes_sweep_leaves_a_live_sandbox_for_its_own_home_to_re_adopt():
    """A server of another home (here: its start-up sweep, run from this process) finds a killed server's live,
    unexpired sandbox and leaves it; the killed server's own home re-adopts it afterwards, files intact."""
    from dsec.server import orphans

    port = free_port()
    server = Server(port)
    client = dsec.Client(server.address)
    successor = None
    ids: list[str] = []
    try:
        sandbox = client.create("busybox", timeout_s=1800)
        ids = [sandbox.id]
        sandbox.files.write("/tmp/mark", "spared\n")
        successor = Server(port, held=True)
        server.kill9()
        swept = orphans.sweep(home_run_root=HOME.parent / f"{HOME.name}-other-home" / "run")
        assert sandbox.id not in swept.registrations and sandbox.id not in swept.cgroups
        assert orphans.registered_dir(sandbox.id) is not None
        successor.go()
        wait_connected(client)
        assert sandbox.files.read_text("/tmp/mark") == "spared\n"
        assert sandbox.exec("echo ok").stdout == b"ok\n"
    finally:
        for server_ in (successor, server):
            if server_ is not None:
                server_.stop()
    assert no_traces(ids) == []
