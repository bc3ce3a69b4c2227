"""kill -9 of a server with allowlisted sandboxes: its successor removes every netns, nft table, veth and slot."""

from __future__ import annotations

import signal
import time

import pytest

import dsec
from dsec.sdk.embedded import EmbeddedServer
from dsec.substrates.container import network

from .conftest import DRIVERS, home, leftovers, network_record

SETTLE_S = 30.0


@pytest.mark.timeout(300)
def test_successor_of_a_killed_server_removes_the_plumbing():
    server = EmbeddedServer.start(home())
    successor = None
    try:
        client = dsec.Client(server.address)
        records = []
        for driver in DRIVERS:
            sandbox = client.create("busybox", driver=driver, timeout_s=600, memory_mb=128, network_allow=["198.18.77.1:80"])
            records.append(network_record(sandbox.id))
        client.close()
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)
        for record in records:
            assert len(leftovers(record)) == 4, "the killed server's plumbing should still be there before reaping"
        successor = EmbeddedServer.start(home())  # reaps dead servers before it reports ready
        deadline = time.monotonic() + SETTLE_S
        while (left := [item for record in records for item in leftovers(record)]) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert left == []
    finally:
        if successor is not None:
            successor.stop()
        server.stop()


def test_teardown_finds_a_slot_claimed_just_before_a_crash(tmp_path):
    """Killed between claiming a slot and recording it: the record has no slot, the scan by owner finds it."""
    sandbox_id = "sb-feedfacefeedface"
    network.prepare(sandbox_id, ["198.18.77.1:80"], tmp_path)
    slot = network.allocate_slot(sandbox_id)
    assert network.NetworkRecord.read(tmp_path).slot == -1
    network.teardown(tmp_path)
    assert network.slots_of(sandbox_id) == [] and not (tmp_path / network.RECORD_NAME).exists()
    network.teardown(tmp_path)  # idempotent
    assert slot >= 0


def test_half_built_plumbing_is_removed(tmp_path):
    """Killed after the netns and veth exist but before the filter: teardown removes what is there."""
    sandbox_id = "sb-0ddba110ddba1100"
    network.prepare(sandbox_id, ["198.18.77.1:80"], tmp_path)
    record = network.NetworkRecord.read(tmp_path)
    record.slot = network.allocate_slot(sandbox_id)
    record.write(tmp_path)
    link = network.Link(record.slot)
    network._run(["ip", "netns", "add", record.netns], sandbox_id)
    network._run(["ip", "link", "add", link.host_if, "type", "veth", "peer", "name", link.peer_if, "netns", record.netns], sandbox_id)
    assert leftovers(record) == [f"netns {record.netns}", f"veth {link.host_if}", f"slot {record.slot}"]
    network.teardown(tmp_path)
    assert leftovers(record) == []
