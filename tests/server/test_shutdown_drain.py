"""Shutdown during a create: the sandbox that finishes starting after the server began stopping is destroyed too.

Found by SIGINT on a trainer with an embedded server: the create under way outlived the server (agent process,
cgroup and overlay mount left until the next server's orphan sweep).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import dsec
from dsec.config import ServerConfig
from dsec.models import SandboxSpec
from dsec.server import orphans
from dsec.server.main import serve
from dsec.substrates.container import cgroups


def _traces(sandbox_id: str) -> list[str]:
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines() if sandbox_id in line]
    found = [f"mount {m}" for m in mounts] + [f"cgroup {d}" for d in cgroups.existing_dirs(f"/dsec/{sandbox_id}")]
    return found + (["registry entry"] if orphans.registered_dir(sandbox_id) is not None else [])


def test_a_create_under_way_at_shutdown_is_destroyed_and_new_creates_are_refused():
    running = serve(ServerConfig(listen="127.0.0.1:0", container_driver="crun"))
    driver = running.manager.drivers.get("crun")
    real_create, created = driver.create, []

    def slow_create(sandbox_id, *args, **kwargs):  # the real create, held until shutdown has begun: it lands mid-create
        created.append(sandbox_id)
        deadline = time.monotonic() + 30
        while not running.manager._closing and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_create(sandbox_id, *args, **kwargs)

    driver.create = slow_create
    client = dsec.Client(running.address)
    outcome: list[object] = []

    def create() -> None:
        try:
            outcome.append(client.create("busybox", "container", driver="crun", timeout_s=120))
        except dsec.DsecError as error:
            outcome.append(error)

    worker = threading.Thread(target=create)
    worker.start()
    deadline = time.monotonic() + 30
    while not created:
        assert time.monotonic() < deadline, "the create never reached the driver"
        time.sleep(0.01)
    stopper = threading.Thread(target=running.stop, kwargs={"grace": 0.1})
    stopper.start()
    stopper.join(60)
    worker.join(60)
    client.close()
    assert not stopper.is_alive() and not worker.is_alive()
    assert outcome and isinstance(outcome[0], dsec.DsecError), outcome  # the caller is not handed a dead sandbox
    assert running.manager.all() == []
    assert _traces(created[0]) == [], (outcome, _traces(created[0]))
    with pytest.raises(dsec.ServerUnavailable, match="shutting down"):
        running.manager.create(SandboxSpec(image="busybox", substrate="container", driver="crun"))
