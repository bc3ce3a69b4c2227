"""Portable snapshots (issue #20 point 7): a snapshot pushed to a real OCI registry (Debian's docker-registry) from
server A and pulled into server B, which has its own $DSEC_HOME (another node: no images, no snapshots, no VM
files of A's), restores there with the same files, and for a microVM the same memory (a process started before the
snapshot still runs). Pushing twice sends no blob again; a corrupted blob is a typed error and leaves nothing;
a pulled snapshot is the puller's alone; bad input is typed; the CLI pushes and pulls."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import dsec
from dsec.config import ServerConfig
from dsec.errors import ImageNotFound, InvalidSpec, SnapshotNotFound
from dsec.models import SnapshotInfo
from dsec.server.main import RunningServer, serve
from dsec.substrates.vm.pulled_gc import PULLED_GRACE_S
from tests.support.registry import Registry, running_registry

pytestmark = pytest.mark.timeout(900)

TOKENS = {"alice": "tok-snapreg-alice-1", "bob": "tok-snapreg-bob-2"}
UPLOADED = r'"PUT /v2/[^ ]+/blobs/uploads/[^ ]+ HTTP/1\.1" 201'


def _manifest_puts(repo: str) -> str:
    return rf'"PUT /v2/{repo}/manifests/[^ ]+ HTTP/1\.1" 201'


def _server(home: Path | None) -> RunningServer:
    config = ServerConfig(listen="127.0.0.1:0", tokens=",".join(f"{t}:{n}" for n, t in TOKENS.items()))
    if home is not None:
        config = config.model_copy(update={"home": home})
    return serve(config)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("snapshot-registry")) as running:
        yield running


@pytest.fixture(scope="module")
def node_a() -> Iterator[dsec.Client]:
    server = _server(None)  # the shared $DSEC_HOME, with the images the setup built
    with dsec.Client(server.address, token=TOKENS["alice"]) as client:
        yield client
    server.stop()


@pytest.fixture(scope="module")
def home_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("node-b-home")
    # a node's setup installs the in-sandbox agent (infra/setup.d/20-agent.sh); nothing else of A's is shared
    shutil.copytree(ServerConfig().bin_dir, home / "bin")
    return home


@pytest.fixture(scope="module")
def server_b(home_b: Path) -> Iterator[RunningServer]:
    server = _server(home_b)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bob_b(server_b: RunningServer) -> Iterator[dsec.Client]:
    with dsec.Client(server_b.address, token=TOKENS["bob"]) as client:
        yield client


@pytest.fixture(scope="module")
def alice_b(server_b: RunningServer) -> Iterator[dsec.Client]:
    with dsec.Client(server_b.address, token=TOKENS["alice"]) as client:
        yield client


def _repo() -> str:
    return f"snapshots/t{uuid.uuid4().hex[:10]}"


def _info(client: dsec.Client, snapshot_id: str) -> SnapshotInfo:
    return next(s for s in client.snapshots() if s.snapshot_id == snapshot_id)


def _visible_dirs(home: Path) -> set[str]:
    root = home / "snapshots"
    return {p.name for p in root.iterdir()} if root.exists() else set()


def test_container_snapshot_restores_on_another_node(registry, node_a, bob_b, alice_b, home_b):
    repo = _repo()
    with node_a.create("busybox", "container", timeout_s=600) as sb:
        sb.exec("mkdir -p /work && echo portable > /work/a.txt && head -c 300000 /dev/urandom > /work/blob")
        blob = sb.files.read("/work/blob")
        snap = _info(node_a, sb.snapshot("portable"))
    try:
        first = node_a.push_snapshot(snap.snapshot_id, f"{registry.host}/{repo}:v1")
        assert first.blobs_uploaded >= 2 and first.digest.startswith("sha256:")
        registry.wait_count(_manifest_puts(repo), 2)  # the base image's manifest, then the snapshot's
        uploads = registry.count(UPLOADED)

        again = node_a.push_snapshot(snap.snapshot_id, f"{registry.host}/{repo}:v1")
        assert (again.digest, again.blobs_uploaded, again.bytes_uploaded) == (first.digest, 0, 0)
        assert again.blobs_present == first.blobs_uploaded + first.blobs_present - 1  # all chunks; the config aside
        registry.wait_count(_manifest_puts(repo), 4)  # the second push is complete in the log
        assert registry.count(UPLOADED) == uploads  # the registry's own log: not one blob sent again

        pulled = bob_b.pull_snapshot(f"{registry.host}/{repo}@{first.digest}")
        assert pulled.snapshot_id != snap.snapshot_id and pulled.kind == snap.kind
        assert pulled.snapshot_id in {s.snapshot_id for s in bob_b.snapshots()}
        assert pulled.snapshot_id not in {s.snapshot_id for s in alice_b.snapshots()}  # the puller's tenant only
        with pytest.raises(SnapshotNotFound):
            alice_b.restore(pulled.snapshot_id)
        with bob_b.restore(pulled.snapshot_id) as restored:
            assert restored.exec("cat /work/a.txt").stdout == b"portable\n"
            assert restored.files.read("/work/blob") == blob
        assert (home_b / "snapshots" / pulled.snapshot_id).is_dir()  # B's own store, not A's
        bob_b.delete_snapshot(pulled.snapshot_id)
    finally:
        node_a.delete_snapshot(snap.snapshot_id)


def test_corrupted_blob_is_a_typed_error_and_leaves_nothing(registry, node_a, bob_b, home_b):
    repo = _repo()
    with node_a.create("busybox", "container", timeout_s=600) as sb:
        sb.exec("head -c 200000 /dev/urandom > /root/noise")
        snap = _info(node_a, sb.snapshot("to-corrupt"))
    try:
        pushed = node_a.push_snapshot(snap.snapshot_id, f"{registry.host}/{repo}:v1")
    finally:
        node_a.delete_snapshot(snap.snapshot_id)
    manifest = registry.manifest(repo, pushed.digest)
    chunk = max(manifest["layers"], key=lambda layer: layer["size"])["digest"]
    path = registry.blob_file(chunk)
    body = bytearray(path.read_bytes())
    body[len(body) // 2] ^= 0xFF  # same length, one flipped byte: only the digest check can tell
    path.write_bytes(bytes(body))

    before_ids = {s.snapshot_id for s in bob_b.snapshots()}
    before_dirs = _visible_dirs(home_b)
    with pytest.raises(InvalidSpec, match="failed verification"):
        bob_b.pull_snapshot(f"{registry.host}/{repo}:v1")
    assert {s.snapshot_id for s in bob_b.snapshots()} == before_ids
    assert _visible_dirs(home_b) == before_dirs  # not even a hidden half-written directory

    with pytest.raises(InvalidSpec, match="not a dsec snapshot"):
        bob_b.pull_snapshot(f"{registry.host}/{repo}@{pushed.image_digest}")  # an image is not a snapshot


def test_microvm_snapshot_restores_memory_on_another_node(registry, node_a, bob_b, home_b, server_b):
    repo = _repo()
    with node_a.create("busybox", "microvm", memory_mb=256, timeout_s=900) as sb:
        started = sb.exec("echo on-disk > /root/f && setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!")
        pid = started.text.strip()
        assert sb.exec(f"kill -0 {pid}").exit_code == 0
        snap = _info(node_a, sb.snapshot("vm-portable"))
    try:
        pushed = node_a.push_snapshot(snap.snapshot_id, f"{registry.host}/{repo}:v1")
        assert snap.kind == "memory+disk"
        pulled = bob_b.pull_snapshot(f"{registry.host}/{repo}:v1")
        # B runs it from its own files: the kernel, initramfs and base disk came in the artifact
        vm_meta = (home_b / "snapshots" / pulled.snapshot_id / "data" / "meta.json").read_text()
        assert str(ServerConfig().home) not in vm_meta
        backing = subprocess.run(["qemu-img", "info", "--output=json", "-U",
                                  str(home_b / "snapshots" / pulled.snapshot_id / "data" / "disk.qcow2")],
                                 capture_output=True, text=True, check=True).stdout
        assert json.loads(backing)["backing-filename"].startswith(str(home_b / "vm" / "pulled"))
        meta = json.loads(vm_meta)
        linked = [Path(meta["machine"]["kernel"]), Path(meta["machine"]["initrd"]), Path(meta["base_disk"])]
        assert all(path.parent == home_b / "vm" / "pulled" and path.is_file() for path in linked)
        gc, later = server_b.manager.snapshot_gc, time.time() + PULLED_GRACE_S + 1
        with bob_b.restore(pulled.snapshot_id) as restored:
            assert restored.exec("cat /root/f").stdout == b"on-disk\n"
            # the process started before the snapshot runs on: its memory came along
            alive = restored.exec(f"kill -0 {pid} && cat /proc/{pid}/cmdline | tr '\\0' ' '")
            assert (alive.exit_code, alive.text.strip()) == (0, "sleep 100000"), alive.stderr
            bob_b.delete_snapshot(pulled.snapshot_id)
            # the snapshot is gone but the VM restored from it runs on those files: a pass past the grace keeps them
            assert not set(gc.collect_pulled_vm_files(now=later)) & set(linked)
            assert restored.exec("cat /root/f").stdout == b"on-disk\n"
        assert pushed.blobs_uploaded >= 2
        # nothing names them now: they go (the pulled snapshot's files no longer outlive it and its VMs)
        assert set(linked) <= set(gc.collect_pulled_vm_files(now=later))
        assert not any(path.exists() for path in linked)
    finally:
        node_a.delete_snapshot(snap.snapshot_id)


def test_bad_input_is_typed_and_the_cli_pushes_and_pulls(registry, node_a, bob_b):
    repo = _repo()
    with pytest.raises(SnapshotNotFound):
        node_a.push_snapshot("snap-0000000000000000", f"{registry.host}/{repo}:v1")
    with pytest.raises(InvalidSpec):
        bob_b.pull_snapshot("not a reference")
    with pytest.raises(ImageNotFound):
        bob_b.pull_snapshot(f"{registry.host}/{repo}:never-pushed")
    with node_a.create("busybox", "container", timeout_s=600) as sb:
        sb.exec("echo via-cli > /root/c")
        snapshot_id = sb.snapshot("cli")
    try:
        with pytest.raises(InvalidSpec, match="tag, not a digest"):
            node_a.push_snapshot(snapshot_id, f"{registry.host}/{repo}@sha256:{'0' * 64}")
        with dsec.Client(node_a.address, token=TOKENS["bob"]) as bob_a, pytest.raises(SnapshotNotFound):
            bob_a.push_snapshot(snapshot_id, f"{registry.host}/{repo}:v1")  # another tenant's is as good as absent

        def cli(address: str, tenant: str, *args: str) -> str:
            done = subprocess.run([sys.executable, "-m", "dsec.cli", "--address", address, "snapshots", *args],
                                  capture_output=True, text=True, timeout=600,
                                  env=os.environ | {"DSEC_TOKEN": TOKENS[tenant]})
            assert done.returncode == 0, done.stderr
            return done.stdout

        pushed = cli(node_a.address, "alice", "push", snapshot_id, f"{registry.host}/{repo}:cli").split()
        assert pushed[0] == f"{registry.host}/{repo}:cli" and pushed[1].startswith("sha256:")
        pulled_id = cli(bob_b.address, "bob", "pull", f"{registry.host}/{repo}@{pushed[1]}").split()[0]
        with bob_b.restore(pulled_id) as restored:
            assert restored.exec("cat /root/c").stdout == b"via-cli\n"
        bob_b.delete_snapshot(pulled_id)
    finally:
        node_a.delete_snapshot(snapshot_id)
