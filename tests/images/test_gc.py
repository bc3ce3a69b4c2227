"""Lifecycle: prune frees only what nothing references; LRU eviction within a budget; held images survive."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsec.images import registry as reg
from dsec.images.gc import disk_usage, prune
from dsec.images.store import LayerStore
from .conftest import Registry
from .layers import Entry, layer_tar, oci_layout, sha

SHARED = layer_tar([Entry("shared", b"s" * 10_000)])
ONLY_A = layer_tar([Entry("a", b"a" * 50_000)])
ONLY_B = layer_tar([Entry("b", b"b" * 50_000)])


def test_prune_keeps_shared_layers_and_frees_unreferenced(fmt_store: LayerStore, tmp_path: Path) -> None:
    a = fmt_store.import_oci_layout(oci_layout(tmp_path / "a", [SHARED, ONLY_A]), tag="a")
    fmt_store.import_oci_layout(oci_layout(tmp_path / "b", [SHARED, ONLY_B]), tag="b")
    assert prune(fmt_store).layers_removed == []  # everything is tagged
    fmt_store.remove("a")
    result = prune(fmt_store)
    assert result.layers_removed == [sha(ONLY_A)] and result.bytes_freed > 50_000
    assert fmt_store.has_layer(sha(SHARED)) and fmt_store.has_layer(sha(ONLY_B))
    assert not fmt_store.has_blob(a.digest)
    assert (fmt_store.resolve("b").lower_dirs[0] / "b").read_bytes() == b"b" * 50_000


def test_held_image_survives_removal_of_its_tag_and_prune(fmt_store: LayerStore, tmp_path: Path) -> None:
    fmt_store.import_oci_layout(oci_layout(tmp_path / "a", [ONLY_A]), tag="a")
    rootfs = fmt_store.acquire("a", "sb-held")
    fmt_store.remove("a")
    prune(fmt_store)
    assert rootfs.lower_dirs[0].is_dir()
    fmt_store.release("sb-held")
    prune(fmt_store)
    assert not rootfs.lower_dirs[0].exists()


def test_lru_eviction_within_budget(store: LayerStore, tmp_path: Path) -> None:
    old = store.import_oci_layout(oci_layout(tmp_path / "old", [ONLY_A]), tag="old")
    store.import_oci_layout(oci_layout(tmp_path / "new", [ONLY_B]), tag="new")
    store.resolve("new")  # most recently used
    total = disk_usage(store).total_bytes
    result = prune(store, budget_bytes=total - 50_000)
    assert result.images_removed == [old.digest]
    assert store.tags() == ["new"] and disk_usage(store).total_bytes <= total - 50_000


@pytest.mark.timeout(120)
def test_evicted_pulled_image_comes_back_lazily(store: LayerStore, registry: Registry, tmp_path: Path) -> None:
    store.import_oci_layout(oci_layout(tmp_path / "src", [ONLY_A]), tag="src")
    ref = f"{registry.host}/gc/app:v1"
    reg.push(store, "src", ref)
    cold = LayerStore(tmp_path / "cold")
    try:
        reg.pull(cold, ref, lazy=False)
        prune(cold, budget_bytes=0)
        assert cold.tags() == [ref] and list(cold.layers_dir.iterdir()) == []
        assert (cold.resolve(ref).lower_dirs[0] / "a").read_bytes() == b"a" * 50_000
    finally:
        cold.close()
