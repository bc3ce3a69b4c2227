"""Fixtures: a freshly built agent run directly on the host, reached over a unix socket or a socketpair."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsec.agent.build import agent_binary
from dsec.agent.client import AgentClient
from dsec.substrates.base import Exited, Output, ProcessHandle

PATH_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"}


@pytest.fixture(scope="session")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agent_binary(tmp_path_factory.mktemp("agent-bin"))


def start_agent(binary: Path, *args: str, **popen: object) -> subprocess.Popen:
    """The agent, SIGTERMed by the kernel if the test process dies (it then cleans up). `setpriv` sets the
    parent-death signal and execs the agent (same pid); a `preexec_fn` doing it ran Python between fork and exec in
    a process whose other threads (grpc's, earlier tests') could hold the loader's or malloc's locks at the fork,
    and then the child hung before it ever listened."""
    return subprocess.Popen(["setpriv", "--pdeathsig", "TERM", str(binary), *args], **popen)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ListeningAgent:
    """An agent in --listen mode; `connect()` opens a new connection (each one is its own stream)."""

    def __init__(self, binary: Path, sock: Path) -> None:
        self.sock = sock
        self.proc = start_agent(binary, "--listen", str(sock), cwd=sock.parent)
        self.clients: list[AgentClient] = []

    def connect(self) -> AgentClient:
        client = AgentClient.connect_unix(self.sock, timeout_s=30, sandbox_id="sb-test")
        self.clients.append(client)
        return client

    def raw(self) -> socket.socket:
        deadline = time.monotonic() + 30
        while not self.sock.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(str(self.sock))
        return s

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        _stop(self.proc)


@pytest.fixture
def listening(agent_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ListeningAgent]:
    agent = ListeningAgent(agent_bin, tmp_path_factory.mktemp("agent-run") / "agent.sock")
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def client(listening: ListeningAgent) -> AgentClient:
    return listening.connect()


@pytest.fixture
def fd_agent(agent_bin: Path) -> Iterator[tuple[AgentClient, subprocess.Popen]]:
    """An agent in --fd mode serving one end of a socketpair; the client holds the other end."""
    host, guest = socket.socketpair()
    proc = start_agent(agent_bin, "--fd", str(guest.fileno()), pass_fds=[guest.fileno()])
    guest.close()
    client = AgentClient(host, sandbox_id="sb-fd")
    try:
        yield client, proc
    finally:
        client.close()
        _stop(proc)


def collect(client: AgentClient, argv: list[str], stdin: bytes | None = None, **spawn: object) -> tuple[bytes, bytes, Exited]:
    """Run a command to completion: (stdout, stderr, Exited)."""
    proc = client.spawn(argv, spawn.pop("env", PATH_ENV), spawn.pop("cwd", "/"), stdin=stdin is not None, **spawn)
    if stdin is not None:
        proc.write_stdin(stdin)
        proc.close_stdin()
    return drain(proc)


def drain(proc: ProcessHandle) -> tuple[bytes, bytes, Exited]:
    out, err, exited = bytearray(), bytearray(), None
    for event in proc.events():
        if isinstance(event, Output):
            (out if event.stream == "stdout" else err).extend(event.data)
        else:
            assert exited is None, "two Exited events"
            exited = event
    assert exited is not None
    return bytes(out), bytes(err), exited


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_dead(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return not pid_alive(pid)


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
