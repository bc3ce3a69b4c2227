"""Egress allowlist end to end, on crun and Docker: only listed destinations answer, sandboxes stay apart."""

from __future__ import annotations

import time

import pytest

from dsec.substrates.container import network

from .conftest import LOCAL_A, LOCAL_B, OUTSIDE_HOST, connect, leftovers, network_record

pytestmark = pytest.mark.timeout(180)
LISTEN = "nc -l -p {port} -e echo reached >/dev/null 2>&1 & sleep 0.3"


def test_allowed_destination_answers_and_nothing_else(spawn, targets):
    sandbox = spawn(network_allow=[f"{LOCAL_A}:{targets.allowed.port}"])
    assert targets.allowed.token in connect(sandbox, LOCAL_A, targets.allowed.port)
    assert connect(sandbox, LOCAL_A, targets.other_port.port) == "", "a port of the allowed host that is not listed"
    assert connect(sandbox, LOCAL_B, targets.allowed.port) == "", "an address that is not listed"
    started = time.monotonic()
    failed = sandbox.exec(f"nc -w 20 {LOCAL_B} {targets.allowed.port} </dev/null", timeout=60)
    assert failed.exit_code != 0
    assert time.monotonic() - started < 10, "a blocked connect is rejected at once, not left to time out"


def test_cidr_without_port_allows_every_port(spawn, targets):
    sandbox = spawn(network_allow=[f"{LOCAL_A}/32"])
    assert targets.allowed.token in connect(sandbox, LOCAL_A, targets.allowed.port)
    assert targets.other_port.token in connect(sandbox, LOCAL_A, targets.other_port.port)
    assert connect(sandbox, LOCAL_B, targets.allowed.port) == ""


def test_routed_destination_is_reached_through_nat(spawn, outside):
    """A destination beyond the host (forward hook): reached, and it sees the host's address, not the sandbox's."""
    sandbox = spawn(network_allow=[f"{outside.address}:{outside.port}"])
    reply = connect(sandbox, outside.address, outside.port)
    assert reply.strip() == f"{outside.token} from {OUTSIDE_HOST}"


def test_default_sandbox_has_no_route(spawn, targets):
    sandbox = spawn()
    routes = sandbox.exec("ip route; ip -o link", timeout=30).text
    assert "default" not in routes and "eth0" not in routes
    assert connect(sandbox, LOCAL_A, targets.allowed.port) == ""
    assert not network.netns_path(sandbox.id).exists()


def test_sandboxes_cannot_reach_each_other(spawn):
    """Even with the whole dsec pool allowlisted, one sandbox cannot open a connection to another."""
    pool = "10.213.0.0/16"
    server = spawn(network_allow=[pool])
    client = spawn(network_allow=[pool])
    server.exec(LISTEN.format(port=9000), timeout=30)
    server_ip = server.exec("ip -o -4 addr show eth0", timeout=30).text.split()[3].split("/")[0]
    client_ip = client.exec("ip -o -4 addr show eth0", timeout=30).text.split()[3].split("/")[0]
    assert server.exec("nc -w 3 127.0.0.1 9000 </dev/null", timeout=30).text.strip() == "reached"
    server.exec(LISTEN.format(port=9000), timeout=30)
    assert connect(client, server_ip, 9000) == ""
    client.exec(LISTEN.format(port=9001), timeout=30)
    assert connect(server, client_ip, 9001) == ""


def test_names_resolve_through_hosts_file(spawn, targets):
    sandbox = spawn(network_allow=[f"localhost:{targets.allowed.port}", f"{LOCAL_A}:{targets.allowed.port}"])
    hosts = sandbox.exec("cat /etc/hosts", timeout=30).text
    assert "127.0.0.1 localhost" in hosts.splitlines()
    assert network_record(sandbox.id).destinations == [
        f"127.0.0.1/32:{targets.allowed.port}", f"{LOCAL_A}/32:{targets.allowed.port}"
    ]  # fmt: skip


def test_destroy_removes_netns_table_veth_and_slot(spawn, targets):
    sandbox = spawn(network_allow=[f"{LOCAL_A}:{targets.allowed.port}"])
    record = network_record(sandbox.id)
    assert leftovers(record) == [f"netns {record.netns}", f"nft table {record.table}", f"veth dsh{record.slot}", f"slot {record.slot}"]
    sandbox.destroy()  # returns once it is killed; its teardown ends in the background (docs/lifecycle.md)
    deadline = time.monotonic() + 20
    while leftovers(record) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers(record) == []


def test_restored_sandbox_gets_its_own_link_and_the_same_allowlist(spawn, net_client, targets):
    original = spawn(network_allow=[f"{LOCAL_A}:{targets.allowed.port}"])
    snapshot_id = original.snapshot()
    try:
        restored = net_client.restore(snapshot_id)
        try:
            assert targets.allowed.token in connect(restored, LOCAL_A, targets.allowed.port)
            assert connect(restored, LOCAL_A, targets.other_port.port) == ""
            assert network_record(restored.id).slot != network_record(original.id).slot
        finally:
            restored.destroy()
    finally:
        net_client.delete_snapshot(snapshot_id)


def _fetch(address: str, port: int) -> str:
    import socket

    try:
        with socket.create_connection((address, port), timeout=5) as conn:
            return conn.recv(100).decode()
    except OSError as error:
        return f"error: {error}"


def test_function_substrate_inherits_the_allowlist(net_client, targets):
    sandbox = net_client.create("python", "function", timeout_s=300, network_allow=[f"{LOCAL_A}:{targets.allowed.port}"])
    try:
        assert targets.allowed.token in sandbox.call(_fetch, LOCAL_A, targets.allowed.port)
        assert sandbox.call(_fetch, LOCAL_A, targets.other_port.port).startswith("error")
    finally:
        sandbox.destroy()
