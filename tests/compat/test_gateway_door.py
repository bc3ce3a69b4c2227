"""The HTTP front door in front of the Ray cluster gateway: the unchanged e2b SDK creates, lists, runs commands
and files in, snapshots, restores, forks and kills sandboxes spread over a 3-node Ray cluster through one address."""

from __future__ import annotations

import os
import uuid

import pytest

ray = pytest.importorskip("ray", reason="ray is installed by infra/setup.d (trainer extras)")

from e2b import Sandbox, SandboxQuery  # noqa: E402
from e2b.exceptions import SandboxNotFoundException  # noqa: E402

from cluster.test_ray_cluster import ray_cluster  # noqa: E402,F401 - the multi-node Ray fixture
from dsec.cluster.ray_deploy import deploy  # noqa: E402

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def door_deployment(ray_cluster):  # noqa: F811
    deployed = deploy(os.environ["DSEC_HOME"], probe_interval_s=0.5, http_listen="127.0.0.1:0")
    yield deployed
    deployed.stop()


def test_e2b_sdk_through_the_gateway_door(door_deployment, monkeypatch):
    url = door_deployment.http_url
    assert url
    for key, value in {"E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": "e2b_cluster"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    tag = uuid.uuid4().hex
    sandboxes = [Sandbox.create(template="base", timeout=120, metadata={"suite": tag}, allow_internet_access=False)
                 for _ in range(3)]
    try:
        owners = {door_deployment.gateway.node_of(sb.sandbox_id) for sb in sandboxes}
        assert len(owners) == 3, "placement spreads the creates over the three nodes"
        listed = Sandbox.list(query=SandboxQuery(metadata={"suite": tag})).next_items()
        assert {s.sandbox_id for s in listed} == {sb.sandbox_id for sb in sandboxes}
        for sb in sandboxes:  # envd (commands, files) reaches each sandbox on its own node through the one address
            assert sb.commands.run(f"echo on {sb.sandbox_id}").stdout.strip() == f"on {sb.sandbox_id}"
            sb.files.write("/tmp/node.txt", sb.sandbox_id)
            assert sb.files.read("/tmp/node.txt") == sb.sandbox_id
        info = sandboxes[1].get_info()
        assert info.metadata == {"suite": tag} and info.template_id == "base"
        sandboxes[2].set_timeout(300)
        snapshot = sandboxes[0].create_snapshot(name=f"gw-{tag[:8]}")
        assert snapshot.snapshot_id in [x.snapshot_id for x in Sandbox.list_snapshots().next_items()]
        assert [x.snapshot_id for x in Sandbox.list_snapshots(sandbox_id=sandboxes[0].sandbox_id).next_items()] == [
            snapshot.snapshot_id]
        restored = Sandbox.create(template=snapshot.snapshot_id, timeout=60)
        assert door_deployment.gateway.node_of(restored.sandbox_id) == door_deployment.gateway.node_of(sandboxes[0].sandbox_id)
        assert restored.kill() is True
        assert Sandbox.delete_snapshot(snapshot.snapshot_id) is True
        assert Sandbox.delete_snapshot(snapshot.snapshot_id) is False
        forks = sandboxes[1].fork(count=1)
        assert len(forks) == 1 and forks[0].kill() is True
    finally:
        for sb in sandboxes:
            assert sb.kill() is True
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sandboxes[0].sandbox_id)
    assert Sandbox.list(query=SandboxQuery(metadata={"suite": tag})).next_items() == []
