"""Named volumes in VMs (issue #20 point 6): a volume's ext4 image is an extra virtio-blk disk of the machine,
mounted by the guest init (microvm: virtio-mmio, vm: q35 PCI). Written in a VM, it survives destroy and reads back in a container and, read-only,
in another VM at the same time; while a VM writes it the host has it not mounted, and a second writer
(container or VM) is VolumeInUse; a VM with volumes takes no snapshot (Unsupported). Through an in-process server and the real SDK."""

from __future__ import annotations

import os
import uuid

import pytest

import dsec
from dsec.config import ServerConfig
from dsec.errors import Unsupported, VolumeInUse
from dsec.server.main import serve

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def client():
    running = serve(ServerConfig(listen="127.0.0.1:0"))
    with dsec.Client(running.address) as c:
        yield c
    running.stop()


@pytest.fixture
def volume(client):
    name = f"t-{uuid.uuid4().hex[:12]}"
    client.volumes.create(name, size_mb=16)
    yield name
    client.volumes.delete(name)


def _host_mounted(name: str) -> bool:
    return os.path.ismount(ServerConfig().volumes_dir / name / "mnt")


@pytest.mark.parametrize("kind", ["microvm", "vm"])
def test_vm_writes_then_container_and_vm_read(client, volume, kind):
    rw = [{"name": volume, "mount_path": "/data"}]
    ro = [{"name": volume, "mount_path": "/mnt/shared data", "read_only": True}]
    with client.create("busybox", kind, memory_mb=256, timeout_s=900, volumes=rw) as writer:
        wrote = writer.exec("echo from-vm > /data/f && head -c 100000 /dev/urandom > /data/blob && md5sum /data/blob")
        assert wrote.exit_code == 0, wrote.stderr
        digest = wrote.text.split()[0]
        assert client.volumes.get(volume).holders == [writer.id]
        assert not _host_mounted(volume)  # two kernels must never write one ext4
        with pytest.raises(VolumeInUse):
            client.create("busybox", "container", volumes=rw)
        with pytest.raises(VolumeInUse):
            client.create("busybox", "microvm", memory_mb=256, volumes=rw)
        with pytest.raises(VolumeInUse):
            client.create("busybox", "container", volumes=ro)
        with pytest.raises(Unsupported, match="named volumes"):  # its memory holds the volume's filesystem
            writer.snapshot()
    assert client.volumes.get(volume).holders == []

    with client.create("busybox", "container", volumes=ro) as container, \
            client.create("busybox", kind, memory_mb=256, timeout_s=900, volumes=ro) as vm:
        for reader in (container, vm):
            got = reader.exec("cat '/mnt/shared data/f' && md5sum '/mnt/shared data/blob'")
            assert got.exit_code == 0, got.stderr
            assert got.text.split()[:2] == ["from-vm", digest]
            denied = reader.exec("echo x > '/mnt/shared data/g'")
            assert denied.exit_code != 0 and b"Read-only" in denied.stderr, denied
        assert sorted(client.volumes.get(volume).holders) == sorted([container.id, vm.id])
        with pytest.raises(VolumeInUse):
            client.create("busybox", "microvm", memory_mb=256, volumes=rw)
    assert client.volumes.get(volume).holders == [] and not _host_mounted(volume)


def test_readopted_microvm_keeps_its_volume_disk(client, volume):
    """kill -9 of the server while a microVM writes a volume: the re-adopting successor keeps the VM (its QEMU, so
    its disks) and the holder; the VM writes on; once destroyed the volume reads back whole in a container."""
    from recovery.test_readopt import Server, wait_connected  # tests/ is on sys.path
    from support.ports import free_port

    port = free_port()
    server = Server(port)
    successor = None
    try:
        with dsec.Client(server.address) as owner:
            sb = owner.create("busybox", "microvm", memory_mb=256, timeout_s=900,
                              volumes=[{"name": volume, "mount_path": "/data"}])
            assert sb.exec("echo before > /data/f").exit_code == 0
            successor = Server(port, held=True)
            server.kill9()
            successor.go()
            wait_connected(owner)
            assert sb.exec("cat /data/f && echo after >> /data/f").text == "before\n"
            assert client.volumes.get(volume).holders == [sb.id]
            assert not _host_mounted(volume)
            sb.destroy()
        assert client.volumes.get(volume).holders == []
        ro = [{"name": volume, "mount_path": "/data", "read_only": True}]
        with client.create("busybox", "container", volumes=ro) as reader:
            assert reader.exec("cat /data/f").text == "before\nafter\n"
    finally:
        for running in (successor, server):
            if running is not None:
                running.stop()
