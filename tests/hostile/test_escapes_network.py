"""Egress to the host's loopback and to a metadata-style address, with the network off and with an allowlist.

The targets are listeners this test owns: one on the host's 127.0.0.1, one on 169.254.169.254 (the cloud metadata
address) bound on a veth link created for the test and deleted after, so a connection that reached the host
is seen by the listener itself. No traffic goes to any address outside this machine: the allowlist names a
TEST-NET address nothing here connects to.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import threading

import pytest

from dsec.errors import DsecError

from .conftest import is_vm
from .table import record

pytestmark = pytest.mark.timeout(300)

METADATA = "169.254.169.254"
UNUSED_ALLOW = "192.0.2.7:443"  # TEST-NET-1: documentation only, never connected to


class Listener:
    """A TCP listener that answers every connection with a token and records who connected."""

    def __init__(self, address: str, port: int = 0) -> None:
        self.token = "dsec-listener-" + secrets.token_hex(6)
        self.connections: list[str] = []
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind((address, port))
        self._server.listen(16)
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._server.accept()
            except OSError:
                continue
            self.connections.append(str(peer))
            with conn:
                conn.sendall(f"HTTP/1.0 200 OK\r\n\r\n{self.token}\n".encode())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()


@pytest.fixture(scope="module")
def metadata_listener():
    """169.254.169.254:80 on a link of our own, removed afterwards even if the tests fail.

    A veth pair stands in for a dummy link (this kernel has no dummy driver): nothing is attached to its peer."""
    tag = secrets.token_hex(3)
    link, peer = f"dsecmd{tag}", f"dsecmp{tag}"
    subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", peer], check=True)
    try:
        subprocess.run(["ip", "addr", "add", f"{METADATA}/32", "dev", link], check=True)
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
        subprocess.run(["ip", "link", "set", peer, "up"], check=True)
        try:
            listener = Listener(METADATA, 80)
        except OSError:
            listener = Listener(METADATA)
        yield listener
        listener.close()
    finally:
        subprocess.run(["ip", "link", "del", link], check=False)


@pytest.fixture
def loopback():
    listener = Listener("127.0.0.1")
    yield listener
    listener.close()


def _probe(case, sandbox, targets: list[tuple[str, int]]) -> str:
    """Try each target from inside; prints what came back (a token means the host listener answered)."""
    if case[1] == "function":
        code = (
            "import socket,sys\n"
            "for t in sys.argv[1:]:\n"
            "  h,p=t.rsplit(':',1)\n"
            "  try:\n"
            "    s=socket.create_connection((h,int(p)),timeout=3);print(t,s.recv(200));s.close()\n"
            "  except OSError as e:\n"
            "    print(t,e.strerror)\n"
        )
        argv = ["python3", "-c", code, *(f"{h}:{p}" for h, p in targets)]
    else:
        loop = "; ".join(f"echo {h}:{p} $(echo GET | nc -w 3 {h} {p} 2>&1)" for h, p in targets)
        argv = ["/bin/sh", "-c", loop + "; ip route 2>/dev/null | head -n 2"]
    try:
        result = sandbox.exec(argv, timeout=60)
    except DsecError as error:
        return f"{type(error).__name__}: {error.message}"
    return f"{result.stdout.decode(errors='replace')} {result.stderr.decode(errors='replace')}"


def _gateway(sandbox) -> str | None:
    """The host end of an allowlisted sandbox's link (its default route), a host address it could aim at."""
    try:
        text = sandbox.exec(["/bin/sh", "-c", "cat /proc/net/route"], timeout=30).text
    except DsecError:
        return None
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000" and fields[2] != "00000000":
            raw = bytes.fromhex(fields[2])[::-1]
            return socket.inet_ntoa(raw)
    return None


def _judge(case, attempt: str, listeners: list[Listener], before: list[int], outcome: str) -> None:
    assert METADATA in outcome, f"the probe did not report: {outcome[-200:]}"
    reached = [
        f"{l.token[-6:]} from {l.connections[n:]}" for l, n in zip(listeners, before)
        if len(l.connections) > n or l.token in outcome
    ]  # fmt: skip
    text = f"REACHED {reached}" if reached else "no connection reached a host listener; " + " ".join(outcome.split())[-50:]
    assert record(case[0], attempt, text, not reached)


def test_egress_network_off_to_loopback_and_metadata(case, spawn, loopback, metadata_listener):
    sandbox = spawn()
    before = [len(loopback.connections), len(metadata_listener.connections)]
    outcome = _probe(case, sandbox, [("127.0.0.1", loopback.port), (METADATA, metadata_listener.port)])
    _judge(case, "egress, network off: host loopback + 169.254.169.254", [loopback, metadata_listener], before, outcome)


def test_egress_with_allowlist_to_loopback_and_metadata(case, spawn, loopback, metadata_listener):
    sandbox = spawn(network_allow=[UNUSED_ALLOW])
    gateway = _gateway(sandbox)
    targets = [("127.0.0.1", loopback.port), (METADATA, metadata_listener.port)]
    if gateway:
        targets.append((gateway, metadata_listener.port))  # the host's own address on the sandbox's link
    before = [len(loopback.connections), len(metadata_listener.connections)]
    outcome = _probe(case, sandbox, targets)
    if is_vm(case):
        outcome = f"guest gateway {gateway}; " + outcome
    _judge(case, f"egress, allowlist [{UNUSED_ALLOW}]: host loopback + metadata", [loopback, metadata_listener], before, outcome)
