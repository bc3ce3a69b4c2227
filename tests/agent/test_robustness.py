"""The agent survives bad input and host disconnects; the client never hangs when the agent dies."""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import socket
import struct
import threading
import time
import tty
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsec.agent.client import HEADER, AgentClient
from dsec.errors import RuntimeFailure

from .conftest import PATH_ENV, ListeningAgent, collect, kill_quietly, start_agent, wait_dead

pytestmark = pytest.mark.timeout(60)

TIOCVHANGUP = 0x5437  # linux/ioctls.h; Python's termios does not export it


def recv_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    head = b""
    while len(head) < HEADER.size:
        more = sock.recv(HEADER.size - len(head))
        assert more, "agent closed the connection"
        head += more
    ftype, rid, length = HEADER.unpack(head)
    payload = b""
    while len(payload) < length:
        payload += sock.recv(length - len(payload))
    return ftype, rid, payload


def test_malformed_frames_get_errors_and_the_agent_survives(listening: ListeningAgent) -> None:
    raw = listening.raw()
    raw.sendall(HEADER.pack(0x55, 7, 3) + b"abc")  # unknown type
    assert recv_frame(raw)[:2] == (0x8F, 7)
    raw.sendall(HEADER.pack(0x01, 8, 5) + b"arg\0x")  # SPAWN whose last string is not terminated
    ftype, rid, payload = recv_frame(raw)
    assert (ftype, rid) == (0x8F, 8) and payload.startswith(b"22\0")
    raw.sendall(HEADER.pack(0x01, 9, 4) + b"arg\0")  # odd number of key/value strings
    assert recv_frame(raw)[:2] == (0x8F, 9)
    raw.sendall(HEADER.pack(0x04, 10, 2) + b"x\0")  # SIGNAL with a non-number
    assert recv_frame(raw)[:2] == (0x8F, 10)
    raw.sendall(HEADER.pack(0x20, 11, 2) + b"ok")  # the same connection still works
    assert recv_frame(raw) == (0xA0, 11, b"ok")
    raw.sendall(b"\xff" * 64)  # a header claiming a 4 GiB payload: ERROR, then the connection is closed
    ftype, rid, payload = recv_frame(raw)
    assert ftype == 0x8F and payload.startswith(b"90\0")
    raw.settimeout(10)
    assert raw.recv(1) == b""
    raw.close()
    assert collect(listening.connect(), ["echo", "still here"])[0] == b"still here\n"
    assert listening.proc.poll() is None


def test_truncated_frame_then_disconnect(listening: ListeningAgent) -> None:
    raw = listening.raw()
    raw.sendall(HEADER.pack(0x01, 1, 1000) + b"arg\0")
    raw.close()
    assert listening.connect().ping() < 5


def test_random_garbage_never_crashes_the_agent(listening: ListeningAgent) -> None:
    for seed in range(20):
        raw = listening.raw()
        raw.sendall(os.urandom(1000 + seed * 97))
        raw.close()
    assert collect(listening.connect(), ["echo", "ok"])[0] == b"ok\n"


def test_disconnect_kills_that_connections_processes(listening: ListeningAgent) -> None:
    keeper = listening.connect()
    doomed = listening.connect()
    kept = keeper.spawn(["sleep", "100"], PATH_ENV, "/")
    killed = doomed.spawn(["sh", "-c", "sleep 100 & echo $!; wait"], PATH_ENV, "/")
    grandchild = int(next(killed.events()).data.split()[0])
    try:
        doomed.close()
        assert wait_dead(killed.pid) and wait_dead(grandchild)
        assert os.path.exists(f"/proc/{kept.pid}")
        kept.signal(signal.SIGKILL)
        assert [e for e in kept.events()][-1].signal == signal.SIGKILL
    finally:
        kill_quietly(grandchild)


def test_agent_death_fails_every_pending_request(listening: ListeningAgent) -> None:
    client = listening.connect()
    proc = client.spawn(["sleep", "100"], PATH_ENV, "/")
    failures: list[BaseException] = []

    def wait_events() -> None:
        try:
            list(proc.events())
        except RuntimeFailure as exc:
            failures.append(exc)

    waiter = threading.Thread(target=wait_events)
    waiter.start()
    try:
        listening.proc.kill()
        waiter.join(timeout=10)
        assert not waiter.is_alive()
        assert failures and "agent connection lost" in str(failures[0]) and "sb-test" in str(failures[0])
        with pytest.raises(RuntimeFailure, match="connection lost"):
            client.spawn(["true"], PATH_ENV, "/")
        with pytest.raises(RuntimeFailure, match="connection lost"):
            client.stat("/")
        proc.signal(signal.SIGKILL)  # a no-op on a dead connection, not an error
    finally:
        kill_quietly(proc.pid)


def test_sigterm_to_the_agent_kills_its_processes(listening: ListeningAgent) -> None:
    proc = listening.connect().spawn(["sleep", "100"], PATH_ENV, "/")
    try:
        listening.proc.terminate()
        assert listening.proc.wait(timeout=10) == 0
        assert wait_dead(proc.pid)
    finally:
        kill_quietly(proc.pid)


def test_connect_times_out_with_a_clear_error(tmp_path) -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeFailure, match="did not listen"):
        AgentClient.connect_unix(tmp_path / "never.sock", timeout_s=0.5, sandbox_id="sb-x")
    assert time.monotonic() - started < 5


def test_connect_waits_for_a_late_agent(agent_bin, tmp_path) -> None:
    sock = tmp_path / "late.sock"
    late = start_agent("/bin/sh", "-c", 'sleep 0.5; exec "$0" --listen "$1"', str(agent_bin), str(sock))
    try:
        with AgentClient.connect_unix(sock, timeout_s=30) as client:
            assert client.ping() < 5
    finally:
        late.terminate()
        late.wait(timeout=10)


def test_fd_mode_exits_and_kills_processes_at_eof(fd_agent) -> None:
    client, agent = fd_agent
    proc = client.spawn(["sleep", "100"], PATH_ENV, "/")
    try:
        client.close()
        assert agent.wait(timeout=10) == 0
        assert wait_dead(proc.pid)
    finally:
        kill_quietly(proc.pid)


def test_device_mode_over_a_pty(agent_bin) -> None:
    """--device serves a char device (a pty here, a virtio-serial port in a VM) with binary-safe frames."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    agent = start_agent(agent_bin, "--device", os.ttyname(slave))
    client = AgentClient.from_fds(master, os.dup(master), sandbox_id="sb-dev")
    try:
        blob = bytes(range(256)) * 16
        assert collect(client, ["cat"], stdin=blob)[0] == blob
    finally:
        client.close()
        agent.terminate()
        agent.wait(timeout=10)
        os.close(slave)


def test_frame_limit_is_enforced_by_the_client(client: AgentClient) -> None:
    with pytest.raises(Exception, match="1 MiB"):
        client.spawn(["echo", "x" * (2 << 20)], PATH_ENV, "/")
    assert client.ping() < 5


def test_request_ids_do_not_leak(client: AgentClient, tmp_path) -> None:
    for _ in range(50):
        collect(client, ["true"])
        client.stat("/")
        with pytest.raises(Exception):
            client.stat(str(tmp_path / "missing"))
    b"".join(client.read_file("/etc/hostname"))
    assert client._pending == {}
    assert struct.calcsize(">BII") == HEADER.size


def test_a_frozen_agent_fails_requests_instead_of_hanging(listening: ListeningAgent, tmp_path) -> None:
    client = AgentClient(listening.raw(), sandbox_id="sb-frozen", request_timeout_s=1.0)
    listening.clients.append(client)
    assert client.ping() < 5
    os.kill(listening.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(RuntimeFailure, match="did not answer"):
            client.stat("/")
        with pytest.raises(RuntimeFailure, match="sb-frozen"):
            client.write_file(str(tmp_path / "partial"), [b"x" * (64 << 20)])
    finally:
        os.kill(listening.proc.pid, signal.SIGCONT)
    assert listening.connect().ping() < 5


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ftype=st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x10, 0x12, 0x13, 0x20, 0x00, 0x7F, 0x81, 0xFF]),
    rid=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=300) | st.lists(st.binary(max_size=20), max_size=8).map(lambda xs: b"\0".join(xs)),
)
def test_fuzzed_frames_never_break_the_stream(listening: ListeningAgent, ftype: int, rid: int, payload: bytes) -> None:
    """Any frame with a valid header leaves the connection usable: a PING sent after it is answered."""
    raw = listening.raw()
    try:
        raw.sendall(HEADER.pack(ftype, rid, len(payload)) + payload)
        raw.sendall(HEADER.pack(0x20, 0, 4) + b"done")
        while recv_frame(raw) != (0xA0, 0, b"done"):
            pass
    finally:
        raw.close()


def _wait_reopened(pid: int, device: str, timeout_s: float = 10.0) -> bool:
    """True once `pid` holds `device` open again (bytes written to a pty before that are not read raw)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fds = Path(f"/proc/{pid}/fd")
        for fd in fds.iterdir():
            try:
                if os.readlink(fd) == device:
                    return True
            except FileNotFoundError:
                pass
        time.sleep(0.02)
    return False


def test_device_hangup_kills_the_streams_processes_and_reopens(agent_bin) -> None:
    """A hung-up device (host side of a virtio port went away) is like a disconnect; the agent then reopens it."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    device = os.ttyname(slave)
    agent = start_agent(agent_bin, "--device", device)
    first = AgentClient.from_fds(os.dup(master), os.dup(master), sandbox_id="sb-dev")
    proc = first.spawn(["sleep", "100"], PATH_ENV, "/")
    try:
        fcntl.ioctl(slave, TIOCVHANGUP)
        assert wait_dead(proc.pid)  # the agent kills a stream's processes just before closing the stream
        first.close()
        assert _wait_reopened(agent.pid, device), "the agent did not reopen its device"
        second = AgentClient.from_fds(os.dup(master), os.dup(master), sandbox_id="sb-dev")
        try:
            assert collect(second, ["echo", "reopened"])[0] == b"reopened\n"
        finally:
            second.close()
    finally:
        first.close()
        kill_quietly(proc.pid)
        agent.terminate()
        agent.wait(timeout=10)
        os.close(slave)
        os.close(master)
