"""Disk accounting and garbage collection of the layer store.

Prune runs under the exclusive `gc` lock, which `resolve`/`acquire` take shared, so a layer is never deleted
between an image being resolved and a sandbox pinning it. Deletion renames into `tmp/` first, so a kill -9
mid-prune leaves the layer either fully present or gone (swept later), never half there.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dsec.images.digest import hex_of
from dsec.images.registry import SOURCE_PREFIX
from dsec.images.store import LayerStore, ImageRecord


@dataclass
class DiskUsage:
    images: int
    layers: int
    layer_bytes: int  # extracted layer dirs or erofs images
    blob_bytes: int  # blobs/ (layer tars, manifests, configs)
    partial_bytes: int  # resumable downloads in progress
    held_images: int

    @property
    def total_bytes(self) -> int:
        return self.layer_bytes + self.blob_bytes + self.partial_bytes


@dataclass
class PruneResult:
    images_removed: list[str] = field(default_factory=list)
    layers_removed: list[str] = field(default_factory=list)
    blobs_removed: int = 0
    bytes_freed: int = 0


def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def disk_usage(store: LayerStore) -> DiskUsage:
    """What the store holds on disk (layers from the db's unpacked sizes; blobs and partials measured)."""
    rows = store.layer_rows()
    partial = store.root / "partial"
    return DiskUsage(
        images=len(store.list()),
        layers=len(rows),
        layer_bytes=sum(r[3] for r in rows),
        blob_bytes=_dir_bytes(store.blobs_dir),
        partial_bytes=_dir_bytes(partial) if partial.exists() else 0,
        held_images=len(set(store.holders().values())),
    )


def _trash(store: LayerStore, path: Path) -> None:
    """Rename out of sight first (atomic), then delete at leisure."""
    if not os.path.lexists(path):
        return
    dest = store.new_tmp(".trash")
    os.rename(path, dest)
    shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() else dest.unlink(missing_ok=True)


def _evict_lru(store: LayerStore, records: list[ImageRecord], budget: int, result: PruneResult) -> None:
    """Drop least-recently-used unheld images until the store fits `budget` bytes.

    Pulled images keep their record and tags (their layers come back lazily on next use); local-only images
    are removed entirely.
    """
    usage = disk_usage(store).total_bytes
    for record in sorted(records, key=lambda r: r.last_used):
        if usage <= budget:
            return
        if record.holders:
            continue
        if store.source_of(record.digest).startswith(SOURCE_PREFIX):
            store.forget_layers_of(record.digest)
        else:
            store.delete_record(record.digest)
            result.images_removed.append(record.digest)
        usage -= record.size


def prune(store: LayerStore, budget_bytes: int | None = None, all_untagged: bool = True) -> PruneResult:
    """Remove untagged unheld images, then (with a budget) LRU images, then every unreferenced layer and blob."""
    result = PruneResult()
    before = disk_usage(store).total_bytes
    with store.lock("gc"):
        records = store.list()
        if all_untagged:
            for record in records:
                if not record.tags and not record.holders:
                    store.delete_record(record.digest)
                    result.images_removed.append(record.digest)
        if budget_bytes is not None:
            _evict_lru(store, [r for r in store.list()], budget_bytes, result)
        needed_layers: set[str] = set()
        needed_blobs: set[str] = set()
        for record in store.list():
            needed_blobs.update({hex_of(record.digest), hex_of(record.config_digest)})
            if store.layers_wanted(record.digest):
                needed_layers.update(hex_of(layer.diff_id) for layer in record.layers)
                needed_blobs.update(hex_of(layer.blob_digest) for layer in record.layers)
        store.unmount_unused()  # erofs layer mounts no sandbox holds (before their images may go)
        for entry in list(store.layers_dir.iterdir()):
            key = entry.name.removesuffix(".erofs")
            if key not in needed_layers:
                _trash(store, entry)
                store.drop_layer_row("sha256:" + key)
                if "sha256:" + key not in result.layers_removed:
                    result.layers_removed.append("sha256:" + key)
        for blob in list(store.blobs_dir.iterdir()):
            if blob.name not in needed_blobs:
                blob.unlink(missing_ok=True)
                result.blobs_removed += 1
        partial = store.root / "partial"
        if partial.exists():
            for leftover in partial.iterdir():
                if leftover.name not in needed_blobs:
                    leftover.unlink(missing_ok=True)
        store.sweep_tmp()
    result.bytes_freed = max(0, before - disk_usage(store).total_bytes)
    return result
