"""Push/pull against a real docker-registry: lazy, single-flight, resumable, verified, kill -9 safe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dsec.errors import ImageNotFound, InvalidSpec
from dsec.images import registry as reg
from dsec.images.store import LayerStore
from .conftest import Registry
from .layers import Entry, layer_tar, oci_layout

LAYERS = [layer_tar([Entry("a", b"alpha" * 1000)]), layer_tar([Entry("b", os.urandom(300_000))]),
          layer_tar([Entry("c", b"gamma")])]


def _pushed(store: LayerStore, registry: Registry, tmp_path: Path, layers: list[bytes] = LAYERS, gz: bool = True) -> str:
    store.import_oci_layout(oci_layout(tmp_path / "src", layers, gzip_layers=gz), tag="src")
    ref = f"{registry.host}/test/app:v1"
    reg.push(store, "src", ref)
    return ref


@pytest.mark.timeout(120)
def test_push_then_lazy_pull_fetches_on_first_use(store: LayerStore, registry: Registry, tmp_path: Path) -> None:
    ref = _pushed(store, registry, tmp_path)
    reg.push(store, "src", ref)  # pushing again skips blobs the registry already has
    cold = LayerStore(tmp_path / "cold")
    try:
        record = reg.pull(cold, ref)
        assert record.digest == store.inspect("src").digest and record.tags == [ref]
        assert list(cold.layers_dir.iterdir()) == []  # lazy: nothing downloaded yet
        assert all(registry.blob_gets(layer.blob_digest) == 0 for layer in record.layers)
        rootfs = cold.resolve(ref)
        assert (rootfs.lower_dirs[-1] / "a").read_bytes() == b"alpha" * 1000
        assert (rootfs.lower_dirs[0] / "c").read_bytes() == b"gamma"
        cold.resolve(ref)
        assert registry.settled_blob_gets([layer.blob_digest for layer in record.layers]) == [1, 1, 1]
    finally:
        cold.close()


@pytest.mark.timeout(180)
def test_fifty_concurrent_creates_on_a_cold_node_download_each_layer_once(
        store: LayerStore, registry: Registry, tmp_path: Path) -> None:
    ref = _pushed(store, registry, tmp_path)
    cold = LayerStore(tmp_path / "cold")
    try:
        record = reg.pull(cold, ref)
        with ThreadPoolExecutor(max_workers=50) as pool:
            results = list(pool.map(lambda i: cold.acquire(ref, f"sb-{i}"), range(50)))
        assert {r.digest for r in results} == {record.digest}
        assert registry.settled_blob_gets([layer.blob_digest for layer in record.layers]) == [1, 1, 1]
        assert cold.inspect(ref).holders == 50
    finally:
        cold.close()


@pytest.mark.timeout(120)
def test_interrupted_download_resumes_with_range(store: LayerStore, registry: Registry, tmp_path: Path) -> None:
    ref = _pushed(store, registry, tmp_path, gz=False)
    cold = LayerStore(tmp_path / "cold")
    try:
        record = reg.pull(cold, ref)
        big = record.layers[1]
        blob = store.blob_path(big.blob_digest).read_bytes()
        partial = reg.partial_path(cold, big.blob_digest)
        partial.write_bytes(blob[: len(blob) // 2])  # what an interrupted download leaves
        client = reg.RegistryClient(registry.host)
        fetched = reg.download_blob(client, "test/app", big.blob_digest, big.size, partial)
        assert fetched == len(blob) - len(blob) // 2
        assert partial.read_bytes() == blob
        cold.resolve(ref)
        assert not partial.exists()
    finally:
        cold.close()


@pytest.mark.timeout(120)
def test_corrupt_partial_is_rejected_then_refetched(store: LayerStore, registry: Registry, tmp_path: Path) -> None:
    ref = _pushed(store, registry, tmp_path, gz=False)
    cold = LayerStore(tmp_path / "cold")
    try:
        record = reg.pull(cold, ref)
        big = record.layers[1]
        partial = reg.partial_path(cold, big.blob_digest)
        partial.write_bytes(b"\0" * (big.size // 2))  # garbage prefix: the resumed whole fails verification
        with pytest.raises(InvalidSpec):
            cold.resolve(ref)
        assert not partial.exists() and not cold.has_layer(big.diff_id)
        cold.resolve(ref)  # the next attempt starts clean and succeeds
        assert cold.has_layer(big.diff_id)
    finally:
        cold.close()


@pytest.mark.timeout(120)
def test_registry_serving_wrong_bytes_is_not_cached(store: LayerStore, registry: Registry, tmp_path: Path) -> None:
    ref = _pushed(store, registry, tmp_path, gz=False)
    record = store.inspect("src")
    target = record.layers[0].blob_digest.split(":")[1]
    data_file = next((tmp_path / "registry" / "data").rglob(f"blobs/sha256/{target[:2]}/{target}/data"))
    data_file.write_bytes(bytes(b ^ 1 for b in data_file.read_bytes()))  # same size, wrong content
    cold = LayerStore(tmp_path / "cold")
    try:
        reg.pull(cold, ref)
        with pytest.raises(InvalidSpec, match="mismatch|not a valid tar"):
            cold.resolve(ref)
        assert not cold.has_layer(record.layers[0].diff_id)
        assert not reg.partial_path(cold, record.layers[0].blob_digest).exists()
    finally:
        cold.close()


def test_bad_references(store: LayerStore) -> None:
    for bad in ("", "no-host", "127.0.0.1:1/UPPER", "127.0.0.1:1/x@sha256:zz"):
        with pytest.raises(InvalidSpec):
            reg.pull(store, bad)


@pytest.mark.timeout(60)
def test_unknown_remote_image(store: LayerStore, registry: Registry) -> None:
    with pytest.raises(ImageNotFound):
        reg.pull(store, f"{registry.host}/nothing/here:v1")


PULLER = r"""
import sys
from pathlib import Path
from dsec.images.registry import pull
from dsec.images.store import LayerStore
pull(LayerStore(Path(sys.argv[1])), sys.argv[2], lazy=False)
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("delay", [0.0, 0.4, 0.9, 1.6])
def test_kill_9_mid_pull_leaves_a_consistent_store(store: LayerStore, registry: Registry, tmp_path: Path, delay: float) -> None:
    big = [layer_tar([Entry(f"f{i}", os.urandom(1 << 20)) for i in range(24)]), layer_tar([Entry("small", b"s")])]
    ref = _pushed(store, registry, tmp_path, layers=big, gz=False)
    root = tmp_path / "cold"
    proc = subprocess.Popen([sys.executable, "-c", PULLER, str(root), ref], stderr=subprocess.PIPE)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    cold = LayerStore(root)  # a fresh opener sweeps the dead puller's temp work
    try:
        assert list(cold.tmp_dir.iterdir()) == []
        for layer_dir in cold.layers_dir.iterdir():  # whatever is visible is complete
            assert layer_dir.name in {layer.diff_id[7:] for layer in store.inspect("src").layers}
        if not any(r.digest == store.inspect("src").digest for r in cold.list()):
            reg.pull(cold, ref)
        rootfs = cold.resolve(ref)
        assert sorted(os.listdir(rootfs.lower_dirs[-1])) == sorted(f"f{i}" for i in range(24))
        assert (rootfs.lower_dirs[-1] / "f3").stat().st_size == 1 << 20
    finally:
        cold.close()
