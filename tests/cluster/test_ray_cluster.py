"""dsec on a 3-node Ray cluster (`ray.cluster_utils.Cluster` on this machine): pinned node agents, spread
placement through the gateway, and a node loss — its sandboxes marked lost and cleaned, its trajectory
resumed on another node from the shared PostgreSQL log."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is installed by infra/setup.d (trainer extras)")

import dsec  # noqa: E402
from dsec.cluster.ray_deploy import deploy  # noqa: E402
from dsec.errors import SandboxStateError  # noqa: E402

from core.leftovers import leftovers  # noqa: E402 - tests/ is on sys.path (rootdir-relative test packages)

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    root = Path(tempfile.mkdtemp(prefix="dsec-ray-", dir="/tmp"))
    (root / "ray").mkdir()
    # Ray state under a temp dir of ours; every Ray process on 127.0.0.1 (Ray's local mode of addressing).
    overrides = {"RAY_TMPDIR": str(root), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    previous = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    common = {"num_cpus": 1}
    cluster = Cluster(initialize_head=True, head_node_args={**common, "include_dashboard": False, "temp_dir": str(root / "ray")})
    try:
        for _ in range(2):
            cluster.add_node(**common)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def deployment(ray_cluster, shared_log_dsn):
    deployed = deploy(os.environ["DSEC_HOME"], probe_interval_s=0.5, server_env={"DSEC_TRAJECTORY_DSN": shared_log_dsn})
    yield deployed
    deployed.stop()


def _wait(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_agents_are_pinned_one_per_node(ray_cluster, deployment):
    node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    infos = [ray.get(agent.info.remote()) for agent in deployment.agents.values()]
    assert {info["node_id"] for info in infos} == node_ids == set(deployment.gateway.nodes)
    assert len({info["server_pid"] for info in infos}) == 3


def test_spread_then_node_loss_and_trajectory_resume(ray_cluster, deployment):
    client = dsec.Client(deployment.address)
    head = ray_cluster.head_node.node_id
    sandboxes = [client.create("busybox", memory_mb=64, labels={"t": "ray"}) for _ in range(6)]
    owners = [deployment.gateway.node_of(sb.id) for sb in sandboxes]
    assert sorted(owners.count(node) for node in set(owners)) == [2, 2, 2]

    # A rollout runs three logged steps in a sandbox on a worker node (not the head, which must stay).
    victim_sandbox = next(sb for sb, node in zip(sandboxes, owners) if node != head)
    victim_node = deployment.gateway.node_of(victim_sandbox.id)
    outputs = []
    with dsec.trajectory("cluster/resume-1", client=client) as tr:
        sandbox = tr.sandbox(lambda: victim_sandbox)
        for step in range(3):
            outputs.append(sandbox.exec(f"echo step-{step} >> /log; wc -l < /log").text)
    assert outputs == ["1\n", "2\n", "3\n"]

    node = next(n for n in ray_cluster.list_all_nodes() if n.node_id == victim_node)
    ray_cluster.remove_node(node)
    assert _wait(lambda: not deployment.gateway.nodes[victim_node].alive, 60), "the gateway never noticed the node loss"
    assert client.connect(victim_sandbox.id).info.state == "lost"
    with pytest.raises(SandboxStateError, match="lost"):
        victim_sandbox.exec("true")
    lost_ids = [sb.id for sb, node in zip(sandboxes, owners) if node == victim_node]
    assert _wait(lambda: not any(leftovers(sid) for sid in lost_ids), 60), [leftovers(sid) for sid in lost_ids]

    # The rollout resumes on another node from the shared log: logged steps return their logged results
    # (re-executed once to rebuild the new sandbox), then the next step runs live on the rebuilt state.
    with dsec.trajectory("cluster/resume-1", client=client) as tr:
        resumed = tr.sandbox(lambda: client.create("busybox", memory_mb=64), rebuild=True)
        assert deployment.gateway.node_of(resumed.id) != victim_node
        assert tr.rebuilt_steps == 3  # the lost sandbox had no snapshot: its 3 logged steps rebuild the new one
        again = [resumed.exec(f"echo step-{step} >> /log; wc -l < /log") for step in range(3)]
        assert [r.text for r in again] == outputs  # the logged results, byte for byte
        live = resumed.exec("echo step-3 >> /log; wc -l < /log")
    assert not live.replayed and live.text == "4\n"
    for sb in sandboxes:
        if sb.id not in lost_ids:
            sb.destroy()
    resumed.destroy()
    client.close()
