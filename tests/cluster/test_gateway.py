"""The gateway in front of real node servers: placement, routing of every call kind, typed errors, node loss."""

from __future__ import annotations

import time

import pytest

import dsec
from dsec.cluster.gateway import Gateway, serve_gateway
from dsec.cluster.placement import Capacity
from dsec.errors import ImageNotFound, SandboxExpired, SandboxNotFound

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def gateway(node_servers):
    gw = Gateway()
    for index, server in enumerate(node_servers):
        gw.add_node(f"node-{index}", server.address, Capacity(cpus=8, memory_mb=8192, sandboxes=64))
    running = serve_gateway(gw, probe_interval_s=0.5)
    client = dsec.Client(running.address)
    yield running, client
    for sandbox in client.list():
        if sandbox.state != "lost":
            client.destroy(sandbox.id)
    client.close()
    running.stop()


def test_creates_spread_and_every_call_kind_is_routed(gateway, tmp_path):
    running, client = gateway
    sandboxes = [client.create("busybox", memory_mb=128, labels={"t": "spread"}) for _ in range(4)]
    nodes = [running.gateway.node_of(sb.id) for sb in sandboxes]
    assert sorted(nodes) == ["node-0", "node-0", "node-1", "node-1"]
    sb = sandboxes[0]
    assert sb.exec("echo routed").text == "routed\n"
    sb.files.write("/tmp/a.txt", b"alpha")
    assert sb.files.read("/tmp/a.txt") == b"alpha"
    assert any(entry.name == "a.txt" for entry in sb.files.list("/tmp"))
    with sb.session() as session:
        session.run("cd /tmp && export X=7")
        assert session.run("echo $X $(pwd)").text.strip() == "7 /tmp"
    source = tmp_path / "tree"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "f").write_bytes(b"x" * 300_000)
    sb.upload(source, "/data")
    assert sb.exec("wc -c < /data/tree/sub/f").text.strip() == "300000"
    out = sb.download("/data/tree", tmp_path / "back")
    assert (out / "sub" / "f").read_bytes() == b"x" * 300_000
    listed = {info.id for info in client.list({"t": "spread"})}
    assert listed == {s.id for s in sandboxes}
    assert client.connect(sandboxes[3].id).exec("true").ok


def test_errors_are_relayed_typed(gateway):
    _, client = gateway
    with pytest.raises(SandboxNotFound):
        client.connect("sb-0000000000000000")
    with pytest.raises(ImageNotFound):
        client.create("no-such-image:never")
    sb = client.create("busybox")
    sb.destroy()
    with pytest.raises(SandboxExpired) as ended:  # the node that ran it still answers why it ended
        sb.exec("true")
    assert ended.value.reason == "destroyed"


def test_a_lost_node_marks_its_sandboxes_lost(gateway, node_servers):
    running, client = gateway
    first, second = client.create("busybox"), client.create("busybox")
    victim_node = running.gateway.node_of(first.id)
    victim = node_servers[int(victim_node.split("-")[1])]
    victim.process.kill()  # kill -9 the node's server
    victim.process.wait()
    deadline = time.monotonic() + 30
    while client.connect(first.id).info.state != "lost" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.connect(first.id).info.state == "lost"
    with pytest.raises(SandboxExpired, match="lost") as lost:
        first.exec("true")
    assert lost.value.reason == "lost"
    assert second.exec("echo alive").text == "alive\n"
    replacement = client.create("busybox")
    assert running.gateway.node_of(replacement.id) != victim_node
    assert first.id in {info.id for info in client.list()}
    first.destroy()  # forgetting a lost sandbox is allowed and final
    assert first.id not in {info.id for info in client.list()}
