"""Named volumes (issue #20 point 6): `client.volumes` create/list/get/delete; a volume mounted read-write in one
sandbox or read-only in many (any other combination is VolumeInUse), surviving sandbox destroy and a server
restart, its size a quota (ENOSPC inside, the host untouched), delete refused while mounted, and no host mount
left once its sandboxes are gone — also after a server died holding it. On crun, runc, docker and function;
VMs: tests/vm/test_volumes_vm.py."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

import dsec
from dsec.config import ServerConfig
from dsec.errors import InvalidSpec, VolumeExists, VolumeInUse, VolumeNotFound
from dsec.server.main import serve
from dsec.server.volumes import VolumeStore

CASES = [
    pytest.param(("container", "crun", "busybox"), id="crun"),
    pytest.param(("container", "runc", "busybox"), id="runc"),
    pytest.param(("container", "docker", "busybox"), id="docker"),
    pytest.param(("function", "", "python"), id="function"),
]


@pytest.fixture(scope="module")
def server():
    running = serve(ServerConfig(listen="127.0.0.1:0"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with dsec.Client(server.address) as c:
        yield c


@pytest.fixture
def volume(client):
    name = f"t-{uuid.uuid4().hex[:12]}"
    client.volumes.create(name, size_mb=16)
    yield name
    try:
        client.volumes.delete(name)
    except VolumeNotFound:
        pass


def _mount_dir(name: str) -> Path:
    return ServerConfig().volumes_dir / name / "mnt"


def test_bad_input_is_typed(client, volume):
    with pytest.raises(InvalidSpec):
        client.volumes.create("Bad/Name", 16)
    with pytest.raises(InvalidSpec):
        client.volumes.create(f"{volume}-x", 1)  # under the minimum
    with pytest.raises(VolumeExists):
        client.volumes.create(volume, 16)
    with pytest.raises(VolumeNotFound):
        client.volumes.delete("t-never-made")
    with pytest.raises(VolumeNotFound):
        client.create("busybox", volumes=[{"name": "t-never-made", "mount_path": "/data"}])
    with pytest.raises(InvalidSpec):
        client.create("busybox", volumes=[{"name": volume, "mount_path": "/data/../etc"}])
    info = client.volumes.get(volume)
    assert (info.name, info.size_mb, info.mode, info.holders) == (volume, 16, "", [])
    assert volume in [v.name for v in client.volumes.list()]


@pytest.mark.parametrize("case", CASES)
def test_one_writer_or_many_readers_survives_destroy(client, volume, case):
    substrate, driver, image = case
    rw = [{"name": volume, "mount_path": "/data"}]
    ro = [{"name": volume, "mount_path": "/data", "read_only": True}]
    with client.create(image, substrate, driver=driver, volumes=rw) as writer:
        assert writer.exec("echo kept > /data/f && cat /data/f").text == "kept\n"
        assert client.volumes.get(volume).holders == [writer.id]
        with pytest.raises(VolumeInUse):
            client.create(image, substrate, driver=driver, volumes=rw)
        with pytest.raises(VolumeInUse):
            client.create(image, substrate, driver=driver, volumes=ro)
        with pytest.raises(VolumeInUse):
            client.volumes.delete(volume)
    assert not os.path.ismount(_mount_dir(volume))  # released with its sandbox
    readers = [client.create(image, substrate, driver=driver, volumes=ro) for _ in range(2)]
    try:
        for reader in readers:
            assert reader.exec("cat /data/f").text == "kept\n"
            denied = reader.exec("echo x > /data/g")
            assert denied.exit_code != 0 and b"Read-only" in denied.stderr, denied
        assert sorted(client.volumes.get(volume).holders) == sorted(r.id for r in readers)
        with pytest.raises(VolumeInUse):
            client.create(image, substrate, driver=driver, volumes=rw)
    finally:
        for reader in readers:
            reader.destroy()
    assert client.volumes.get(volume).mode == ""
    assert not os.path.ismount(_mount_dir(volume))
    client.volumes.delete(volume)
    assert volume not in [v.name for v in client.volumes.list()]


@pytest.mark.parametrize("case", CASES[:1] + CASES[2:3])
def test_quota_is_enospc_inside(client, volume, case):
    substrate, driver, image = case
    with client.create(image, substrate, driver=driver, volumes=[{"name": volume, "mount_path": "/v"}]) as sb:
        full = sb.exec("dd if=/dev/zero of=/v/big bs=1M count=64")
        assert full.exit_code != 0 and b"No space left" in full.stderr, full
        assert sb.exec("echo still > /tmp/x && cat /tmp/x").text == "still\n"  # only the volume is full
    image_file = ServerConfig().volumes_dir / volume / "volume.ext4"
    assert image_file.stat().st_blocks * 512 <= 16 << 20  # the host spent no more than the quota


def test_survives_server_restart(volume, client):
    with client.create("busybox", volumes=[{"name": volume, "mount_path": "/data"}]) as sb:
        sb.exec("echo across > /data/f")
    second = serve(ServerConfig(listen="127.0.0.1:0"))
    try:
        with dsec.Client(second.address) as other:
            assert volume in [v.name for v in other.volumes.list()]
            with other.create("busybox", volumes=[{"name": volume, "mount_path": "/data"}]) as sb:
                assert sb.exec("cat /data/f").text == "across\n"
    finally:
        second.stop()


def test_dead_holder_is_unmounted_at_recovery(client, volume):
    """A server killed while a sandbox held the volume leaves it mounted and listed as held; the next start
    (manager.reap_dead_servers → VolumeStore.recover) drops holders that are no longer registered and unmounts."""
    store = VolumeStore(ServerConfig().volumes_dir)
    store.acquire("sb-00000000deadbeef", [(volume, False)])
    assert os.path.ismount(_mount_dir(volume))
    assert store.recover(alive=lambda sandbox_id: False) == [volume]
    assert not os.path.ismount(_mount_dir(volume))
    assert client.volumes.get(volume).holders == []


def test_kill9_keeps_a_readopted_holder_and_the_next_reaping_start_unmounts(client, volume):
    """kill -9 with a volume mounted: the successor re-adopts the sandbox, which keeps its volume (still mounted,
    still held, its files there); a successor that reaps instead (--no-readopt) unmounts it."""
    from recovery.test_readopt import Server, wait_connected  # tests/ is on sys.path
    from support.ports import free_port

    port = free_port()
    server = Server(port)
    successor = None
    try:
        with dsec.Client(server.address) as owner:
            sb = owner.create("busybox", volumes=[{"name": volume, "mount_path": "/data"}])
            sb.exec("echo before > /data/f")
            successor = Server(port, held=True)
            server.kill9()
            successor.go()
            wait_connected(owner)
            assert sb.exec("cat /data/f && echo after >> /data/f").text == "before\n"
            assert client.volumes.get(volume).holders == [sb.id]
            assert os.path.ismount(_mount_dir(volume))
            reaper = Server(port, "--no-readopt", held=True)
            successor.kill9()
            successor = reaper.go()
        assert client.volumes.get(volume).holders == []
        assert not os.path.ismount(_mount_dir(volume))
        with client.create("busybox", volumes=[{"name": volume, "mount_path": "/data", "read_only": True}]) as reader:
            assert reader.exec("cat /data/f").text == "before\nafter\n"
    finally:
        for running in (successor, server):
            if running is not None:
                running.stop()


def test_a_volume_belongs_to_its_tenant(secured_server):
    from server.conftest import TOKENS  # tests/ is on sys.path

    name = f"t-{uuid.uuid4().hex[:12]}"
    with dsec.Client(secured_server.address, token=TOKENS["alice"]) as alice, \
            dsec.Client(secured_server.address, token=TOKENS["bob"]) as bob:
        alice.volumes.create(name, 16)
        try:
            assert name not in [v.name for v in bob.volumes.list()]
            with pytest.raises(VolumeNotFound):
                bob.volumes.get(name)
            with pytest.raises(VolumeNotFound):
                bob.volumes.delete(name)
            with pytest.raises(VolumeNotFound):
                bob.create("busybox", volumes=[{"name": name, "mount_path": "/data"}])
        finally:
            alice.volumes.delete(name)
