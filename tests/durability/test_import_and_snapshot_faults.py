"""Image imports and sandbox snapshots under disk faults: ENOSPC (a full loop-mounted ext4) and EIO (faultfs.py).

What must hold (issue #22, point 5): the operation fails with a typed dsec error; nothing half-written becomes
visible (no image or tag, no layer directory, no blob whose bytes disagree with its digest, no listed or
restorable snapshot, no leftover snapshot directory); and once the disk is healthy the same store works again.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import pytest

import dsec
from dsec.config import ServerConfig
from dsec.errors import DiskFull, DsecError, ImageNotFound, RuntimeFailure
from dsec.images.store import LayerStore
from dsec.server.main import serve
from dsec.server.snapshots import SnapshotStore
from images.layers import Entry, docker_archive, layer_tar  # tests/images' archive builder


pytestmark = pytest.mark.timeout(300)


def _random_layer(megabytes: int) -> bytes:
    """A layer of incompressible files: its blob and its extraction each take `megabytes`."""
    return layer_tar([Entry(f"data/{i}.bin", secrets.token_bytes(1 << 20)) for i in range(megabytes)])


def _assert_nothing_half_written(store: LayerStore, tag: str) -> None:
    with pytest.raises(ImageNotFound):
        store.lookup(tag)
    assert not [r for r in store.list() if tag in r.tags], f"{tag} is listed"
    assert not list(store.layers_dir.iterdir()), f"a layer directory is visible: {list(store.layers_dir.iterdir())}"
    for blob in store.blobs_dir.rglob("*"):
        if blob.is_file():
            digest = hashlib.sha256(blob.read_bytes()).hexdigest()
            assert blob.name.endswith(digest), f"blob {blob} does not match its digest (half-written)"
    assert not list(store.tmp_dir.iterdir()), "work in progress was left in tmp/"


def _import_until_error(store: LayerStore, archive: Path, tag: str) -> DsecError:
    try:
        store.import_docker_archive(archive, tag)
    except DsecError as error:
        return error
    raise AssertionError("the import succeeded on a failing disk")


def test_image_import_enospc(small_disk, tmp_path):
    archive = docker_archive(tmp_path / "big.tar", [_random_layer(12)], ["big:1"])  # blob + extraction > 16 MB
    store = LayerStore(small_disk.mount / "images", "dir")
    try:
        error = _import_until_error(store, archive, "big:1")
        assert isinstance(error, DiskFull), f"expected DiskFull, got {type(error).__name__}: {error}"
        _assert_nothing_half_written(store, "big:1")
        small = docker_archive(tmp_path / "small.tar", [_random_layer(1)], ["small:1"])
        assert store.import_docker_archive(small, "small:1").digest  # the space was given back
    finally:
        store.close()


def test_image_import_eio(fault_fs, tmp_path):
    archive = docker_archive(tmp_path / "img.tar", [_random_layer(2)], ["img:1"])
    store = LayerStore(fault_fs.mount / "images", "dir")
    try:
        fault_fs.fail_io()
        error = _import_until_error(store, archive, "img:1")
        assert isinstance(error, RuntimeFailure) and "I/O error" in str(error), f"EIO reported as {type(error).__name__}: {error}"
        fault_fs.heal()
        _assert_nothing_half_written(store, "img:1")
        assert store.import_docker_archive(archive, "img:1").digest
    finally:
        store.close()


@pytest.fixture(scope="module")
def server():
    running = serve(ServerConfig(listen="127.0.0.1:0"))
    client = dsec.Client(running.address)
    yield running, client
    client.close()
    running.stop()


def _swap_snapshot_root(running, root: Path) -> SnapshotStore:
    """Point the live server's snapshot store at the faulty filesystem (same class, same owner mark)."""
    original = running.manager.snapshots
    root.mkdir(parents=True, exist_ok=True)
    running.manager.snapshots = SnapshotStore(root, owner=original.owner)
    return original


def _assert_no_snapshot_visible(client, sandbox, root: Path) -> None:
    assert not client.snapshots(sandbox.id), "a failed snapshot is listed"
    assert not [p.name for p in root.iterdir()], f"a failed snapshot left {[p.name for p in root.iterdir()]}"


@pytest.mark.parametrize("substrate", ["crun", "docker", "microvm"])
@pytest.mark.parametrize("fault", ["enospc", "eio"])
def test_snapshot_under_disk_fault(fault, substrate, server, request):
    running, client = server
    disk = request.getfixturevalue("small_disk" if fault == "enospc" else "fault_fs")
    root = disk.mount / "snapshots"
    original = _swap_snapshot_root(running, root)
    if substrate in ("crun", "docker"):
        sandbox = client.create("busybox", "container", driver=substrate, disk_mb=64)
    else:  # the hostile suite's guest shape: restored from its template; its memory state alone exceeds 16 MB
        sandbox = client.create("busybox", "microvm", memory_mb=256, timeout_s=600)
    try:
        sandbox.exec("head -c 24000000 /dev/urandom > /big")  # a 24 MB layer: more than the 16 MB disk holds
        if fault == "eio":
            disk.fail_io()
        with pytest.raises(DsecError) as caught:
            sandbox.snapshot()
        if fault == "enospc":
            assert isinstance(caught.value, DiskFull), f"expected DiskFull, got {type(caught.value).__name__}: {caught.value}"
        else:
            assert not isinstance(caught.value, DiskFull), f"EIO reported as {type(caught.value).__name__}"
            disk.heal()
        _assert_no_snapshot_visible(client, sandbox, root)
        assert sandbox.exec("echo alive").text.strip() == "alive"  # the sandbox was resumed after the failed capture
        sandbox.exec("rm /big")
        if fault == "enospc" and substrate == "microvm":  # 16 MB never holds a VM's memory state: a healthy disk
            running.manager.snapshots = original
        snapshot = sandbox.snapshot()  # healthy again: a snapshot works and restores
        restored = client.restore(snapshot)
        try:
            assert restored.exec("test ! -e /big && echo ok").text.strip() == "ok"
        finally:
            restored.destroy()
            client.delete_snapshot(snapshot)
    finally:
        sandbox.destroy()
        running.manager.snapshots = original
        os.sync()
