"""`AgentClient.launch`: a spawn that returns before the agent confirms it (the exec engine's path), through a
real agent: the same output, exit and typed errors as `spawn`, only raised from the events; a frozen agent is still
an error, never a hang."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import pytest

from dsec.agent.client import AgentClient
from dsec.errors import CommandNotFound, FileNotFoundInSandbox, PermissionDeniedInSandbox, RuntimeFailure
from dsec.substrates.base import Exited, Output

from .conftest import PATH_ENV, ListeningAgent, drain

pytestmark = pytest.mark.timeout(120)


def test_launch_gives_output_exit_and_pid(client: AgentClient) -> None:
    proc = client.launch(["sh", "-c", "echo out; echo err >&2; exit 3"], PATH_ENV, "/")
    assert drain(proc) == (b"out\n", b"err\n", Exited(3, 0))
    assert proc.pid > 0
    assert client._pending == {}


def test_launch_errors_are_typed_and_come_from_the_events(client: AgentClient, tmp_path) -> None:
    cases = [
        (["no-such-command-xyz"], "/", CommandNotFound),
        ([str(tmp_path / "not-executable")], "/", PermissionDeniedInSandbox),
        (["true"], str(tmp_path / "missing"), FileNotFoundInSandbox),
    ]
    (tmp_path / "not-executable").write_text("#!/bin/sh\n")
    for argv, cwd, error in cases:
        proc = client.launch(argv, PATH_ENV, cwd)
        with pytest.raises(error) as info:
            drain(proc)
        assert "sb-test" in str(info.value)
    assert client._pending == {}
    assert drain(client.launch(["true"], PATH_ENV, "/"))[2] == Exited(0, 0)  # the stream is still in step


def test_signal_before_the_start_is_confirmed_reaches_the_process(client: AgentClient) -> None:
    proc = client.launch(["sleep", "100"], PATH_ENV, "/")
    proc.signal(signal.SIGKILL)  # sent by request id: the agent handles it after the spawn
    assert drain(proc)[2] == Exited(-signal.SIGKILL, signal.SIGKILL)


def test_a_silent_launched_process_is_not_timed_out(listening: ListeningAgent) -> None:
    client = AgentClient(listening.raw(), sandbox_id="sb-slow", request_timeout_s=0.5)
    listening.clients.append(client)
    # silent for four control-request timeouts: the timeout covers the start only, not the process's run
    assert drain(client.launch(["sleep", "2"], PATH_ENV, "/"))[2] == Exited(0, 0)


@contextlib.contextmanager
def frozen_agent(listening: ListeningAgent, request_timeout_s: float = 1.0) -> Iterator[AgentClient]:
    """A client of an agent stopped with SIGSTOP for the block's duration; the agent answers a new connection
    afterwards."""
    client = AgentClient(listening.raw(), sandbox_id="sb-frozen", request_timeout_s=request_timeout_s)
    listening.clients.append(client)
    assert client.ping() < 5
    os.kill(listening.proc.pid, signal.SIGSTOP)
    try:
        yield client
    finally:
        os.kill(listening.proc.pid, signal.SIGCONT)
    assert listening.connect().ping() < 5


def test_launch_on_a_frozen_agent_fails_instead_of_hanging(listening: ListeningAgent) -> None:
    with frozen_agent(listening) as client:
        proc = client.launch(["true"], PATH_ENV, "/")
        with pytest.raises(RuntimeFailure, match="did not answer spawn of true.*sb-frozen"):
            drain(proc)


def test_next_event_waits_at_most_its_timeout(client: AgentClient) -> None:
    proc = client.launch(["sh", "-c", "echo first; sleep 1; echo second"], PATH_ENV, "/")
    assert proc.timed_events
    events = []
    timeouts = 0
    started = time.monotonic()
    while not events or not isinstance(events[-1], Exited):
        event = proc.next_event(0.05)
        if event is None:
            timeouts += 1
        else:
            events.append(event)
    assert timeouts >= 5 and time.monotonic() - started < 30  # quiet for a second: a None each 0.05 s
    assert b"".join(e.data for e in events if isinstance(e, Output)) == b"first\nsecond\n"
    assert events[-1] == Exited(0, 0) and proc.next_event(0) == Exited(0, 0)
    assert client._pending == {}


def test_next_event_raises_a_failed_start(client: AgentClient) -> None:
    with pytest.raises(CommandNotFound):
        client.launch(["no-such-command-xyz"], PATH_ENV, "/").next_event(30)


def test_next_event_on_a_frozen_agent_fails_within_the_request_timeout(listening: ListeningAgent) -> None:
    # a request timeout well above next_event's own, so a stall of the test itself cannot run the former out first
    with frozen_agent(listening, request_timeout_s=5.0) as client:
        proc = client.launch(["true"], PATH_ENV, "/")
        assert proc.next_event(0.1) is None  # its own timeout first
        with pytest.raises(RuntimeFailure, match="did not answer spawn of true"):
            proc.next_event(60)  # then the request timeout, not this one
