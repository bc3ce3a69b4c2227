"""No sandbox outlives its owner: destroy, server shutdown, and a server killed with -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import dsec

from .leftovers import leftovers

DRIVERS = ["crun", "runc", "docker"]


def _wait_clean(sandbox_id: str, timeout_s: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (found := leftovers(sandbox_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


@pytest.mark.parametrize("driver", DRIVERS)
def test_destroy_removes_processes_mounts_cgroups_state(client, driver):
    sb = client.create("busybox", driver=driver)
    sb.exec("sleep 1000 >/dev/null 2>&1 &")
    assert leftovers(sb.id), "a live sandbox should be visible on the host (sanity check of the probe)"
    sb.destroy()
    assert _wait_clean(sb.id) == []


def test_server_shutdown_destroys_its_sandboxes():
    owner = dsec.Client()
    ids = [owner.create("busybox", driver=d).id for d in DRIVERS[:2]]
    owner.close()
    for sandbox_id in ids:
        assert _wait_clean(sandbox_id) == []


def _start_server() -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "dsec.server.main", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    for raw in process.stdout:
        line = raw.decode().strip()
        if line.startswith("DSEC_SERVER_READY "):
            return process, line.split(" ", 1)[1]
    raise AssertionError("server did not start")


def test_server_killed_with_sigkill_is_cleaned_by_the_next_start():
    process, address = _start_server()
    client = dsec.Client(address)
    ids = [client.create("busybox", driver=d).id for d in DRIVERS]
    for sandbox_id in ids:
        client.connect(sandbox_id).exec("sleep 1000 >/dev/null 2>&1 &")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    client.close()
    assert all(leftovers(sandbox_id) for sandbox_id in ids), "kill -9 leaves the sandboxes running until cleanup"
    successor, _ = _start_server()  # a new server reaps what the dead one left
    try:
        for sandbox_id in ids:
            assert _wait_clean(sandbox_id) == [], sandbox_id
    finally:
        successor.send_signal(signal.SIGTERM)
        successor.wait(60)
