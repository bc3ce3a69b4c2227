"""Host-side destinations for egress tests, a server of our own, and an audit of what an allowlist leaves behind.

Every destination lives on this machine: two addresses on a test veth (local delivery: the host's input hook)
and one inside a throwaway netns behind another veth (routed: the forward hook and masquerading), so no packet
of these tests leaves the host.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import dsec
from dsec.sdk.embedded import EmbeddedServer
from dsec.substrates.container import network

DRIVERS = ["crun", "runc", "docker"]
LOCAL_A, LOCAL_B = "198.18.77.1", "198.18.77.2"  # benchmark range (RFC 2544): never routed anywhere
OUTSIDE_HOST, OUTSIDE_PEER = "198.19.77.1", "198.19.77.2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def home() -> Path:
    return Path(os.environ["DSEC_HOME"])


@pytest.fixture(scope="session")
def net_server() -> Iterator[EmbeddedServer]:
    server = EmbeddedServer.start(home())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def net_client(net_server: EmbeddedServer) -> Iterator[dsec.Client]:
    client = dsec.Client(net_server.address)
    yield client
    client.close()


class BannerServer:
    """A TCP listener on 0.0.0.0 that greets each connection with a token (and remembers who connected)."""

    def __init__(self) -> None:
        self.token = "dsec-net-" + secrets.token_hex(6)
        self.peers: list[str] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                continue
            self.peers.append(peer[0])
            with conn:
                conn.sendall(f"{self.token}\n".encode())

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@dataclass
class Targets:
    allowed: BannerServer  # reachable on LOCAL_A when allowlisted
    other_port: BannerServer  # same host, port not allowlisted


@pytest.fixture(scope="session")
def targets() -> Iterator[Targets]:
    """Two local addresses on a test veth pair, and two banner servers on every address."""
    name = f"dsnt{os.getpid() % 100000}"
    ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b")
    try:
        for address in (LOCAL_A, LOCAL_B):
            ip("addr", "add", f"{address}/32", "dev", f"{name}a")
        ip("link", "set", f"{name}a", "up")
        ip("link", "set", f"{name}b", "up")
        servers = Targets(BannerServer(), BannerServer())
        try:
            yield servers
        finally:
            servers.allowed.close()
            servers.other_port.close()
    finally:
        subprocess.run(["ip", "link", "delete", f"{name}a"], capture_output=True)


@dataclass
class Outside:
    address: str
    port: int
    token: str


OUTSIDE_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
while True:
    c, peer = s.accept()
    c.sendall(f"{sys.argv[2]} from {peer[0]}\\n".encode()); c.close()
"""


@pytest.fixture(scope="session")
def outside() -> Iterator[Outside]:
    """A 'remote' host: a netns behind a veth with its own /30, routed (not local) from the host's view."""
    tag = f"{os.getpid() % 100000}"
    netns, host_if = f"dsec-test-outside-{tag}", f"dsno{tag}"
    token = "dsec-outside-" + secrets.token_hex(6)
    ip("netns", "add", netns)
    process = None
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("addr", "add", f"{OUTSIDE_HOST}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", netns, "addr", "add", f"{OUTSIDE_PEER}/30", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "link", "set", "lo", "up")
        process = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", OUTSIDE_SERVER, OUTSIDE_PEER, token],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield Outside(OUTSIDE_PEER, port, token)
    finally:
        if process is not None:
            process.kill()
            process.wait()
        subprocess.run(["ip", "link", "delete", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True)


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def spawn(net_client: dsec.Client, driver: str) -> Iterator[Callable[..., dsec.Sandbox]]:
    """Create busybox sandboxes on the current driver; all destroyed at teardown, also on failure."""
    made: list[dsec.Sandbox] = []

    def make(**options) -> dsec.Sandbox:
        sandbox = net_client.create("busybox", driver=driver, timeout_s=300, memory_mb=128, **options)
        made.append(sandbox)
        return sandbox

    yield make
    for sandbox in made:
        try:
            sandbox.destroy()
        except dsec.DsecError:
            pass


def network_record(sandbox_id: str) -> network.NetworkRecord:
    """The live sandbox's network record, found in whichever server run dir holds its state."""
    for state_dir in (home() / "run").glob(f"*/{sandbox_id}"):
        record = network.NetworkRecord.read(state_dir)
        if record is not None:
            return record
    raise AssertionError(f"no network record for {sandbox_id} under {home() / 'run'}")


def leftovers(record: network.NetworkRecord) -> list[str]:
    """What of this sandbox's network plumbing is still on the host."""
    found = []
    if network.netns_path(record.sandbox_id).exists():
        found.append(f"netns {record.netns}")
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    if record.table in tables.split():
        found.append(f"nft table {record.table}")
    host_if = network.Link(record.slot).host_if
    if subprocess.run(["ip", "link", "show", host_if], capture_output=True).returncode == 0:
        found.append(f"veth {host_if}")
    if network.slots_of(record.sandbox_id):
        found.append(f"slot {record.slot}")
    return found


def connect(sandbox: dsec.Sandbox, address: str, port: int) -> str:
    """What a TCP connect from inside the sandbox read ('' when it failed), via busybox nc."""
    result = sandbox.exec(f"nc -w 5 {address} {port} </dev/null", timeout=30)
    return result.text if result.exit_code == 0 else ""
