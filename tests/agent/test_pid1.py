"""PID-1 duties, checked with the agent as PID 1 of a fresh PID namespace (as in a container)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsec.agent.client import AgentClient
from dsec.errors import RuntimeFailure

from .conftest import PATH_ENV, collect, start_agent

pytestmark = pytest.mark.timeout(60)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _zombies(pid: int) -> list[int]:
    out = []
    for child in _children(pid):
        try:
            if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                out.append(child)
        except FileNotFoundError:
            pass
    return out


@contextlib.contextmanager
def _pid1_agent(agent_bin: Path, sock: Path, *extra: str) -> Iterator[tuple[AgentClient, int, subprocess.Popen]]:
    """(client, host pid of the agent, unshare wrapper) for an agent that is PID 1 of its own PID namespace."""
    wrapper = start_agent(
        "/usr/bin/unshare", "--pid", "--fork", "--kill-child", "--mount-proc", str(agent_bin), "--listen", str(sock), *extra
    )
    try:
        client = AgentClient.connect_unix(sock, timeout_s=30, sandbox_id="sb-pid1")
        try:
            yield client, _children(wrapper.pid)[0], wrapper
        finally:
            client.close()
    finally:
        if wrapper.poll() is None:
            for pid in _children(wrapper.pid):
                os.kill(pid, signal.SIGKILL)  # PID 1 dies: the kernel kills the rest of the namespace
        wrapper.wait(timeout=10)


@pytest.fixture
def pid1_agent(agent_bin: Path, tmp_path: Path) -> Iterator[tuple[AgentClient, int]]:
    with _pid1_agent(agent_bin, tmp_path / "agent.sock") as (client, pid, _):
        yield client, pid


def test_agent_is_pid1_and_reaps_orphans(pid1_agent) -> None:
    client, agent_pid = pid1_agent
    assert collect(client, ["sh", "-c", "echo $PPID"])[0] == b"1\n"
    for _ in range(5):
        collect(client, ["sh", "-c", "sleep 0.2 & exit 0"])  # the sleep is orphaned to the agent
    deadline = time.monotonic() + 30  # each orphan exits, then the agent must reap it: no child of PID 1 remains
    while _children(agent_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _zombies(agent_pid) == [] and _children(agent_pid) == []


def test_pid1_agent_ignores_sigterm_and_sigint(pid1_agent) -> None:
    client, agent_pid = pid1_agent
    subprocess.run(["kill", "-TERM", str(agent_pid)], check=True)
    subprocess.run(["kill", "-INT", str(agent_pid)], check=True)
    time.sleep(0.2)
    assert client.ping() < 5
    assert collect(client, ["echo", "alive"], env=PATH_ENV)[0] == b"alive\n"


def test_pid1_agent_with_exit_on_term_stops_cleanly(agent_bin: Path, tmp_path: Path) -> None:
    with _pid1_agent(agent_bin, tmp_path / "agent.sock", "--exit-on-term") as (client, agent_pid, wrapper):
        proc = client.spawn(["sleep", "100"], PATH_ENV, "/")
        os.kill(agent_pid, signal.SIGTERM)
        assert wrapper.wait(timeout=10) == 0  # unshare reports its child's exit status: the agent exited 0
        with pytest.raises(RuntimeFailure):
            list(proc.events())
