"""Allowlist entries: strict parsing (SDK and server both answer InvalidSpec naming the entry), the nft ruleset,
and slot allocation without collisions."""

from __future__ import annotations

import ipaddress
import multiprocessing
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import ValidationError

import dsec
from dsec.allowlist import Destination, parse_entry, resolve
from dsec.errors import CapacityExceeded, InvalidSpec, Unsupported
from dsec.models import SandboxSpec
from dsec.substrates.container import network
from dsec.v1 import sandbox_pb2 as pb

GOOD = {
    "10.1.2.3": ("10.1.2.3/32", "", None),
    "10.1.2.3:443": ("10.1.2.3/32", "", 443),
    "10.0.0.0/8": ("10.0.0.0/8", "", None),
    "192.168.0.0/16:53": ("192.168.0.0/16", "", 53),
    "pypi.org:443": (None, "pypi.org", 443),
    "Files.PythonHosted.org": (None, "files.pythonhosted.org", None),
    "localhost:1": (None, "localhost", 1),
}
BAD = [
    "", " ", "10.1.2.3 ", "10.1.2.3:0", "10.1.2.3:65536", "10.1.2.3:", "10.1.2.3:80x", "10.1.2.3:-1", "10.1.2.3:+80",
    "10.1.2.3/33", "10.1.2.3/24", "1.2.3.999", "01.2.3.4", "::1", "[::1]:80", "2001:db8::/32", "-bad.example",
    "bad-.example", "exa mple.org", "a..b", "*.example.org", "http://example.org", "example.org:80:90", "a" * 300,
    "ex_ample.org", "10.1.2.3\n", "\0",
]  # fmt: skip


@pytest.mark.parametrize("entry", list(GOOD))
def test_good_entries_parse(entry):
    parsed = parse_entry(entry)
    network, hostname, port = GOOD[entry]
    assert (str(parsed.network) if parsed.network else None, parsed.hostname, parsed.port) == (network, hostname, port)


@pytest.mark.parametrize("entry", BAD)
def test_bad_entries_are_invalid_spec_naming_the_entry(entry):
    with pytest.raises(ValueError, match="allowlist entry"):
        parse_entry(entry)
    with pytest.raises(ValidationError, match="allowlist entry"):
        SandboxSpec(network_allow=["10.9.9.9", entry])


def test_too_many_entries():
    with pytest.raises(ValueError, match="at most"):
        SandboxSpec(network_allow=[f"10.0.0.{i}" for i in range(65)])


def test_host_network_and_allowlist_exclude_each_other():
    with pytest.raises(ValueError, match="network=False"):
        SandboxSpec(network=True, network_allow=["10.0.0.1"])


def test_resolve_literal_and_name():
    destinations = resolve(["10.0.0.0/8:80", "localhost:8080"], "sb-test")
    assert destinations == [
        Destination(ipaddress.IPv4Network("10.0.0.0/8"), 80, "10.0.0.0/8:80"),
        Destination(ipaddress.IPv4Network("127.0.0.1/32"), 8080, "localhost:8080"),
    ]


@pytest.mark.timeout(120)
def test_sdk_and_server_reject_bad_entries(net_client):
    with pytest.raises(InvalidSpec, match="10.0.0.1:99999"):
        net_client.create("busybox", network_allow=["10.0.0.1:99999"])
    # the server validates too (a client that skips the SDK's checks)
    request = pb.CreateRequest(spec=pb.SandboxSpec(image="busybox", network_allow=["10.0.0.1", "no spaces allowed"]))
    with pytest.raises(InvalidSpec, match="no spaces allowed"):
        net_client.rpc(net_client.sandboxes.Create, request)
    request = pb.CreateRequest(spec=pb.SandboxSpec(image="busybox", network=True, network_allow=["10.0.0.1"]))
    with pytest.raises(InvalidSpec, match="network=False"):
        net_client.rpc(net_client.sandboxes.Create, request)


def test_ruleset_is_valid_nft():
    """`nft -c` checks the generated table against the kernel without installing it."""
    destinations = resolve(["10.0.0.0/8:80", "192.0.2.7"], "sb-test")
    ruleset = network.nft_ruleset(network.table_name("sb-0123456789abcdef"), network.Link(7), destinations)
    checked = subprocess.run(["nft", "-c", "-f", "-"], input=ruleset, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert 'iifname "dsh7" ip daddr 10.0.0.0/8 meta l4proto { tcp, udp } th dport 80 accept' in ruleset
    assert 'iifname "dsh7" ip daddr 192.0.2.7/32 accept' in ruleset
    assert 'oifname "dsh7" drop' in ruleset


def test_links_tile_the_pool():
    first, last = network.Link(0), network.Link(network.SLOTS - 1)
    assert (str(first.host_ip), str(first.sandbox_ip)) == ("10.213.0.1", "10.213.0.2")
    assert str(last.subnet) == "10.213.255.252/30"
    assert len(last.host_if) <= 15


def _claim_many(args: tuple[str, int]) -> list[int]:
    alloc_dir, count = args
    return [network.allocate_slot(f"sb-p{multiprocessing.current_process().pid}-{i}", Path(alloc_dir)) for i in range(count)]


def test_concurrent_claims_never_collide(tmp_path):
    """Threads and processes (as concurrent servers would) claim slots from one directory: all distinct."""
    with multiprocessing.get_context("fork").Pool(4) as pool:
        by_process = pool.map(_claim_many, [(str(tmp_path), 100)] * 4)
    with ThreadPoolExecutor(8) as threads:
        by_thread = list(threads.map(lambda i: network.allocate_slot(f"sb-t{i}", tmp_path), range(200)))
    slots = [slot for chunk in by_process for slot in chunk] + by_thread
    assert len(slots) == len(set(slots)) == 600
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.isdigit()) == []  # no claim file left behind
    assert network.slots_of("sb-t5", tmp_path) == [by_thread[5]]
    network.release_slot(by_thread[5], "sb-other", tmp_path)  # not its owner: kept
    assert network.slots_of("sb-t5", tmp_path) == [by_thread[5]]
    network.release_slot(by_thread[5], "sb-t5", tmp_path)
    assert network.slots_of("sb-t5", tmp_path) == []


def test_full_pool_is_capacity_exceeded(tmp_path, monkeypatch):
    monkeypatch.setattr(network, "SLOTS", 4)
    for i in range(4):
        network.allocate_slot(f"sb-{i}", tmp_path)
    with pytest.raises(CapacityExceeded, match="destroy sandboxes"):
        network.allocate_slot("sb-full", tmp_path)


def test_teardown_without_record_is_a_no_op(tmp_path):
    network.teardown(tmp_path)
    network.teardown(tmp_path / "missing")


def test_dsec_exports_the_errors():
    assert dsec.InvalidSpec is InvalidSpec and dsec.Unsupported is Unsupported
