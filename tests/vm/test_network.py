"""The NIC of allowlisted VMs at driver level: device model, crash reaping, snapshot/spec consistency.

End-to-end egress (allowed, refused, NAT, destroy, restore) is tests/network/test_vm_egress.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dsec.errors import InvalidSpec
from dsec.models import SandboxSpec
from dsec.substrates.container import network
from dsec.substrates.vm.driver import QemuDriver
from dsec.substrates.vm.machine import MachineSpec, qemu_argv
from dsec.substrates.vm.template import template_key

from .conftest import MEMORY_MB

pytestmark = pytest.mark.timeout(300)
ALLOW = ["198.18.77.1:9"]  # never contacted: these tests look at the plumbing, not at traffic


def _spec(allow: list[str]) -> SandboxSpec:
    return SandboxSpec(substrate="microvm", resources={"memory_mb": MEMORY_MB}, network_allow=allow)


def _plumbing(sandbox_id: str) -> list[str]:
    found = []
    if network.netns_path(sandbox_id).exists():
        found.append("netns")
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    if network.table_name(sandbox_id) in tables.split():
        found.append("table")
    if network.slots_of(sandbox_id):
        found.append("slot")
    return found


def test_nic_is_part_of_the_device_model(microvm_driver: QemuDriver, tmp_path: Path):
    plain = microvm_driver.machine_for(_spec([]))
    nic = microvm_driver.machine_for(_spec(ALLOW))
    assert not plain.nic and nic.nic and "dsec.ip=" in nic.cmdline and "dsec.ip=" not in plain.cmdline
    base = tmp_path / "base.raw"
    base.write_bytes(b"")
    assert template_key(plain, base) != template_key(nic, base)
    assert "-netdev" not in qemu_argv("qemu", plain, tmp_path, None)
    template_argv = " ".join(qemu_argv("qemu", nic, tmp_path, None))
    sandbox_argv = " ".join(qemu_argv("qemu", nic, tmp_path, None, Path("/run/netns/x")))
    assert "hubport" in template_argv and "virtio-net-device" in template_argv
    assert "tap,id=net0,ifname=tap0" in sandbox_argv and "vnet_hdr=off" in sandbox_argv
    assert MachineSpec(**{k: v for k, v in nic.to_dict().items() if k != "nic"}).nic is False  # older snapshots


def test_reaper_removes_qemu_and_plumbing_of_an_allowlisted_vm(microvm_driver: QemuDriver, busybox_image, tmp_path: Path):
    state_dir = tmp_path / "sb-netreap"
    sandbox = microvm_driver.create("sb-netreap", _spec(ALLOW), busybox_image, state_dir)
    try:
        assert _plumbing("sb-netreap") == ["netns", "table", "slot"]
        pid = sandbox.process.proc.pid
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")  # QEMU runs in the netns
        microvm_driver.cleanup_state_dir(state_dir)  # what a restarted server runs after kill -9
        assert sandbox.process.proc.wait(timeout=10) is not None
        assert _plumbing("sb-netreap") == []
    finally:
        microvm_driver.destroy(sandbox)
    assert list(state_dir.iterdir()) == []


def test_restore_needs_the_same_nic(microvm_driver: QemuDriver, busybox_image, tmp_path: Path):
    sandbox = microvm_driver.create("sb-netsnap", _spec(ALLOW), busybox_image, tmp_path / "sb-netsnap")
    try:
        sandbox.snapshot(tmp_path / "snap")
    finally:
        microvm_driver.destroy(sandbox)
    with pytest.raises(InvalidSpec, match="network_allow"):
        microvm_driver.restore("sb-netbad", _spec([]), busybox_image, tmp_path / "snap", tmp_path / "sb-netbad")
    assert _plumbing("sb-netbad") == [] and _plumbing("sb-netsnap") == []
