"""The egress allowlist on the VM substrates: QEMU in the sandbox's netns, a tap NAT'd onto the container plumbing.

Destinations are the local ones of conftest.py. One allowlisted microvm serves most checks (a template boot
costs seconds under TCG); the q35 machine gets one reachability check of its own device model.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import dsec
from .conftest import LOCAL_A, LOCAL_B, Outside, Targets, connect, leftovers, network_record

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def vm_allowed(net_client: dsec.Client, targets: Targets) -> Iterator[dsec.Sandbox]:
    sandbox = net_client.create(
        "busybox", "microvm", memory_mb=256, timeout_s=600,
        network_allow=[f"{LOCAL_A}:{targets.allowed.port}", f"localhost:{targets.allowed.port}"],
    )  # fmt: skip
    yield sandbox
    try:
        sandbox.destroy()
    except dsec.DsecError:
        pass


def test_allowlisted_microvm_reaches_only_the_listed_destination(vm_allowed: dsec.Sandbox, targets: Targets):
    assert targets.allowed.token in connect(vm_allowed, LOCAL_A, targets.allowed.port)
    assert connect(vm_allowed, LOCAL_A, targets.other_port.port) == ""
    assert connect(vm_allowed, LOCAL_B, targets.allowed.port) == ""
    refused = vm_allowed.exec(f"nc -w 5 {LOCAL_B} {targets.allowed.port} </dev/null; echo rc=$?", timeout=30)
    assert "rc=1" in refused.text
    hosts = vm_allowed.files.read("/etc/hosts").decode()
    assert "localhost" in hosts and "127.0.0.1" in hosts


def test_allowlisted_microvm_reaches_a_routed_host_through_nat(net_client: dsec.Client, outside: Outside):
    sandbox = net_client.create(
        "busybox", "microvm", memory_mb=256, timeout_s=600, network_allow=[f"{outside.address}:{outside.port}"]
    )
    try:
        answer = connect(sandbox, outside.address, outside.port)
        assert outside.token in answer
        assert "10.0.2.15" not in answer and "10.213." not in answer  # masqueraded twice: it sees the host
    finally:
        sandbox.destroy()


def test_vm_without_allowlist_has_no_nic(net_client: dsec.Client):
    sandbox = net_client.create("busybox", "microvm", memory_mb=256, timeout_s=600)
    try:
        links = sandbox.exec("ls /sys/class/net").text.split()
        assert "eth0" not in links
    finally:
        sandbox.destroy()


def test_destroy_leaves_no_plumbing(vm_allowed: dsec.Sandbox):
    record = network_record(vm_allowed.id)
    assert leftovers(record) == [f"netns {record.netns}", f"nft table {record.table}", f"veth dsh{record.slot}", f"slot {record.slot}"]
    vm_allowed.destroy()
    assert leftovers(record) == []


def test_restored_vm_keeps_its_allowlist_on_a_new_link(vm_allowed: dsec.Sandbox, net_client: dsec.Client, targets: Targets):
    snapshot_id = vm_allowed.snapshot()
    try:
        restored = net_client.restore(snapshot_id)
        try:
            assert targets.allowed.token in connect(restored, LOCAL_A, targets.allowed.port)
            assert connect(restored, LOCAL_A, targets.other_port.port) == ""
            assert network_record(restored.id).slot != network_record(vm_allowed.id).slot
            assert targets.allowed.token in connect(vm_allowed, LOCAL_A, targets.allowed.port)
        finally:
            record = network_record(restored.id)
            restored.destroy()
            assert leftovers(record) == []
    finally:
        net_client.delete_snapshot(snapshot_id)


def test_q35_vm_allowlist(net_client: dsec.Client, targets: Targets):
    sandbox = net_client.create("busybox", "vm", memory_mb=256, timeout_s=600, network_allow=[f"{LOCAL_A}:{targets.allowed.port}"])
    try:
        assert targets.allowed.token in connect(sandbox, LOCAL_A, targets.allowed.port)
        assert connect(sandbox, LOCAL_A, targets.other_port.port) == ""
    finally:
        record = network_record(sandbox.id)
        sandbox.destroy()
        assert leftovers(record) == []
