"""The crash suite against the real server and SDK: a 50-step rollout with side effects in its sandbox.

* kill -9 the client at random points and resume: the final sandbox state and trajectory equal an
  uninterrupted run's, and the server executed exactly 50 steps (`bench/trajectory_log.py` kills the log
  owner 100 times; set DSEC_TRAJECTORY_CLIENT_KILLS for a longer run here).
* kill -9 the server at random points, restart it on the same home: no acknowledged record is lost, and the
  rebuilt sandbox (opt-in: the old one died with its server) holds every step's effect exactly once.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import dsec
from dsec.v1 import sandbox_pb2 as pb

from .conftest import DRIVER, ServerProcess

STEPS = 50
CLIENT_KILLS = int(os.environ.get("DSEC_TRAJECTORY_CLIENT_KILLS", "10"))
ROLLOUT = Path(__file__).with_name("rollout.py")


def _rollout(address: str, tid: str, rebuild: bool = False) -> subprocess.Popen:
    argv = [sys.executable, str(ROLLOUT), tid, str(STEPS), "--driver", DRIVER] + (["--rebuild"] if rebuild else [])
    env = os.environ | {"DSEC_ADDRESS": address}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _finish(process: subprocess.Popen) -> tuple[list[str], str]:
    """The rest of the rollout's output (one stream, so lines already read stay consistent) and its tail."""
    assert process.stdout is not None
    try:
        out = process.stdout.read()  # the test's timeout bounds this if the rollout hangs
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    lines = out.splitlines()
    return lines, "\n".join(lines[-30:])


def _await_acks(process: subprocess.Popen, count: int) -> list[str]:
    """Read the rollout's output up to its `count`-th acknowledged step (or its exit); returns the lines read.

    Kills land at these protocol points, not after a sleep, so a fast or a slow machine kills at the same steps.
    """
    assert process.stdout is not None
    lines: list[str] = []
    seen = 0
    for line in process.stdout:  # the test's timeout bounds this if the rollout hangs
        lines.append(line.rstrip("\n"))
        if line.startswith("ACK"):
            seen += 1
            if seen >= count:
                break
    return lines


def _expected_ack(step: int) -> str:
    return f"ACK {step} step_{step}_count_{step + 1}"


def _final_state(client: dsec.Client, tid: str) -> tuple[list[str], str, list[bytes]]:
    with dsec.trajectory(tid, client=client) as tr:
        sandbox = client.connect(tr.sandbox_id)
        steps = tr.steps()
    assert [s.state for s in steps] == ["done"] * STEPS
    logged = [pb.ExecRecord.FromString(s.result).stdout for s in steps]
    return sandbox.exec("cat /tmp/steps.log").text.split(), sandbox.exec("cat /tmp/count").text.strip(), logged


def _uninterrupted(server: ServerProcess, client: dsec.Client):
    tid = f"crash/clean/{uuid.uuid4().hex[:8]}"
    lines, err = _finish(_rollout(server.address, tid))
    assert "DONE" in lines, err
    return _final_state(client, tid)


@pytest.mark.timeout(600)
def test_client_killed_at_random_points(dsec_server: ServerProcess) -> None:
    """Kill the client CLIENT_KILLS times; when a rollout completes before the kills are spent (a resumed
    rollout replays fast), the next kills hit a new rollout. Every completed rollout is then audited."""
    rng = random.Random(42)
    new_id = lambda: f"crash/client/{uuid.uuid4().hex[:8]}"  # noqa: E731
    tid, done = new_id(), []
    acks: dict[str, set[str]] = {}
    sandboxes: dict[str, set[str]] = {}
    kills = 0
    for _attempt in range(CLIENT_KILLS * 3 + 10):
        process = _rollout(dsec_server.address, tid)
        early: list[str] = []
        if kills < CLIENT_KILLS:
            # Kill after a random acknowledged step that this attempt runs live (a replayed prefix acks too), and
            # before the last one, so the kill always lands inside the rollout whatever the machine's speed.
            live_from = len(acks.get(tid, ())) + 1
            early = _await_acks(process, rng.randint(min(live_from, STEPS - 1), STEPS - 1))
            process.kill()
        lines, err = _finish(process)
        lines = early + lines
        assert process.returncode in (0, -9), err
        kills += process.returncode == -9  # a kill sent after the rollout's own exit did not land: not counted
        acks.setdefault(tid, set()).update(line for line in lines if line.startswith("ACK"))
        sandboxes.setdefault(tid, set()).update(line.split()[1] for line in lines if line.startswith("SANDBOX"))
        if "DONE" in lines:
            done.append(tid)
            if kills >= CLIENT_KILLS:
                break
            tid = new_id()
    assert kills == CLIENT_KILLS and done
    with dsec.Client(dsec_server.address) as client:
        for finished in done:
            assert len(sandboxes[finished]) == 1  # every resumed client re-attached to the same live sandbox
            assert acks[finished] == {_expected_ack(step) for step in range(STEPS)}  # each seen result: the one run's
            killed = _final_state(client, finished)
            assert killed[0] == [str(step) for step in range(STEPS)] and killed[1] == str(STEPS)
        assert dsec_server.executed("exec") == STEPS * len(done)  # 50 per rollout, however many restarts
        assert killed == _uninterrupted(dsec_server, client)


@pytest.mark.timeout(600)
def test_server_killed_at_random_points(dsec_server: ServerProcess) -> None:
    rng = random.Random(7)
    tid = f"crash/server/{uuid.uuid4().hex[:8]}"
    acks: set[str] = set()
    how: list[str] = []
    server_kills = 0
    for _attempt in range(10):
        process = _rollout(dsec_server.address, tid, rebuild=True)
        early: list[str] = []
        if server_kills < 3:
            # kill while steps run: after a random acknowledged step, however fast or slow the machine is
            early = _await_acks(process, rng.randint(1, STEPS // 2))
            dsec_server.kill9()
            server_kills += 1
        lines, err = _finish(process)
        lines = early + lines
        acks |= {line for line in lines if line.startswith("ACK")}
        how += [line.split()[2] for line in lines if line.startswith("SANDBOX")]
        if dsec_server.process.poll() is not None:
            dsec_server.start()  # same home: the same trajectory log, its torn tail (if any) truncated
        if "DONE" in lines and server_kills >= 3:
            break
    assert server_kills == 3
    assert "rebuilt" in how  # the sandbox died with its server; the resumed rollout rebuilt it (opt-in)
    assert acks == {_expected_ack(step) for step in range(STEPS)}  # 0 acknowledged records lost or altered
    with dsec.Client(dsec_server.address) as client:
        steps_log, count, logged = _final_state(client, tid)
    assert steps_log == [str(step) for step in range(STEPS)] and count == str(STEPS)  # each effect exactly once
    assert logged == [f"step {step} count {step + 1}\n".encode() for step in range(STEPS)]
