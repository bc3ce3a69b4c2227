"""layer_format=erofs: one erofs image per layer, loop-mounted once, reference-counted by holds, never leaked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dsec.config import ServerConfig
from dsec.images.gc import prune
from dsec.images.store import LayerStore
from dsec.models import SandboxSpec
from dsec.server.drivers import DriverRegistry
from dsec.substrates.base import Exited, Output
from .conftest import mounts_under
from .layers import Entry, layer_tar, oci_layout, sha

BASE = layer_tar([Entry("bin", kind="dir"), Entry("etc", kind="dir"), Entry("etc/motd", b"base\n")])
APP = layer_tar([Entry("app", kind="dir"), Entry("app/data", b"d" * 100_000)])


def _loops_of(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout.strip()


@pytest.fixture
def estore(tmp_path: Path):
    root = tmp_path / "images"
    store = LayerStore(root, "erofs")
    try:
        yield store
    finally:
        store.unmount_unused(keep=set())
        store.close()
        assert mounts_under(root) == []


def test_layers_are_erofs_images_mounted_once_and_refcounted_by_holds(estore: LayerStore, tmp_path: Path) -> None:
    estore.import_oci_layout(oci_layout(tmp_path / "a", [BASE, APP]), tag="a")
    estore.import_oci_layout(oci_layout(tmp_path / "b", [BASE]), tag="b")
    assert sorted(p.name for p in estore.layers_dir.iterdir()) == sorted(f"{sha(x)[7:]}.erofs" for x in (BASE, APP))
    assert mounts_under(estore.root) == []  # nothing is mounted before first use
    a1 = estore.acquire("a", "sb-1")
    a2 = estore.acquire("a", "sb-2")
    b = estore.acquire("b", "sb-3")
    assert a1.lower_dirs == a2.lower_dirs and b.lower_dirs[0] == a1.lower_dirs[1]  # one mount per layer
    assert (a1.lower_dirs[0] / "app/data").read_bytes() == b"d" * 100_000
    assert len(mounts_under(estore.root)) == 2
    with pytest.raises(OSError):
        (a1.lower_dirs[1] / "etc/new").write_text("x")  # read-only
    estore.release("sb-1")
    assert len(mounts_under(estore.root)) == 2  # sb-2 still holds both layers
    estore.release("sb-2")
    assert [line.split(" ")[1] for line in mounts_under(estore.root)] == [str(b.lower_dirs[0])]  # BASE: sb-3
    estore.release("sb-3")
    assert mounts_under(estore.root) == []
    assert _loops_of(estore.erofs_path(sha(BASE))) == ""  # loop devices cleared with their mounts


@pytest.mark.timeout(120)
def test_prune_detaches_mounts_without_breaking_a_running_sandbox(estore: LayerStore, tmp_path: Path) -> None:
    from dsec.images.base_images import build_busybox

    build_busybox(estore)
    rootfs = estore.resolve("busybox")  # no hold: only the running overlay keeps the layer alive
    driver = DriverRegistry(ServerConfig()).get("crun")
    state = estore.new_tmp("-sb")
    state.mkdir()
    sandbox = driver.create(f"erofs-{uuid.uuid4().hex[:8]}", SandboxSpec(image="busybox", driver="crun"), rootfs, state)
    try:
        estore.remove("busybox")
        result = prune(estore)
        assert result.layers_removed and not any(estore.layers_dir.iterdir())
        assert not [line for line in mounts_under(estore.mounts_dir)]  # detached from the namespace
        out, code = b"", None
        for event in sandbox.spawn(["sh", "-c", "cat /etc/passwd | head -1; ls /bin | wc -l"], {"PATH": "/bin"}, "/").events():
            if isinstance(event, Output):
                out += event.data
            elif isinstance(event, Exited):
                code = event.exit_code
        assert code == 0 and out.startswith(b"root:") and int(out.split()[-1]) > 50
    finally:
        driver.destroy(sandbox)
        driver.cleanup_state_dir(state)
    assert mounts_under(estore.root) == []
    assert str(estore.root) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout  # loop freed


def test_switching_format_rebuilds_layers_from_stored_blobs(tmp_path: Path) -> None:
    root = tmp_path / "images"
    dir_store = LayerStore(root, "dir")
    dir_store.import_oci_layout(oci_layout(tmp_path / "a", [BASE, APP]), tag="a")
    dir_store.close()
    erofs_store = LayerStore(root, "erofs")
    try:
        top = erofs_store.resolve("a").lower_dirs[0]
        assert top.parent == erofs_store.mounts_dir and (top / "app/data").stat().st_size == 100_000
    finally:
        erofs_store.close()
    assert mounts_under(root) == []
    assert LayerStore(root, "dir").resolve("a").lower_dirs[0] == root / "layers" / sha(APP)[7:]


FAKE_MKFS = """#!/bin/sh
# argv: --quiet DEST SRC; writes half an image, then hangs: the test kill -9s the importer here
printf 'half' > "$2"
sleep 60
"""


@pytest.mark.timeout(120)
def test_kill_9_mid_mkfs_leaves_no_half_image(tmp_path: Path) -> None:
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir()
    (fake_bin / "mkfs.erofs").write_text(FAKE_MKFS)
    (fake_bin / "mkfs.erofs").chmod(0o755)
    layout = oci_layout(tmp_path / "a", [BASE])
    root = tmp_path / "images"
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    code = f"from dsec.images.store import LayerStore; LayerStore({str(root)!r}, 'erofs').import_oci_layout({str(layout)!r}, 'a')"
    child = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list((root / "tmp").glob("*/layer.erofs")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list((root / "tmp").glob("*/layer.erofs")), "the importer never reached mkfs"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    store = LayerStore(root, "erofs")  # sweeps the dead importer's tmp/
    try:
        assert not store.has_layer(sha(BASE)) and list(store.layers_dir.iterdir()) == []
        assert list(store.tmp_dir.iterdir()) == []
        store.import_oci_layout(layout, tag="a")
        assert (store.resolve("a").lower_dirs[0] / "etc/motd").read_bytes() == b"base\n"
    finally:
        store.unmount_unused(keep=set())
        store.close()
