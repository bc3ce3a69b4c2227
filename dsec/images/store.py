"""The node-local, content-addressed image store shared by every dsec server process on the machine.

Layout under `root` (= `ServerConfig().images_dir`):

    blobs/sha256/<hex>     OCI blobs (manifests, configs, layer tars) exactly as received     blobs.py
    layers/<diff hex>/     extracted layers, the overlay lower dirs every sandbox shares read-only (format dir)
    layers/<diff hex>.erofs  the same layer as one erofs image (format erofs)                layers.py
    mounts/<diff hex>/     where an erofs layer is loop-mounted read-only, once per machine, while in use
    store.db               SQLite (WAL): images, tags, holders, build cache                   index.py
    tmp/<pid>-<rand>       work in progress; renamed into place when complete, swept when its pid is dead
    locks/                 flock files: one per layer (single extraction) and `gc` (prune vs. users)  workspace.py

Why this shape: a sandbox create must cost the same for a 10 MB and a 2 GB image, so layers are extracted
once and stacked by overlayfs; a kill -9 at any point leaves only a `tmp/` entry, never a half layer under
`layers/`, because every layer and blob becomes visible by a single rename after it was verified.

`LayerStore` is the facade callers use: it holds the three parts and does what spans them (resolving an image
to lower dirs, pinning it for a sandbox, imports and lazy pulls under the `gc` lock).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from dsec.errors import ImageNotFound
from dsec.images.blobs import BlobStore, disk_errors
from dsec.images.extract import FileRegion
from dsec.images.importers import import_docker_archive, import_oci_layout
from dsec.images.index import ImageIndex, check_tag
from dsec.images.layers import LAYER_FORMATS, LayerCache, check_format
from dsec.images.registry import fetch_layer
from dsec.images.types import ImageRecord, ImageRootfs, LayerInfo
from dsec.images.workspace import Workspace


class LayerStore:
    """Process-safe image store; see the module docstring for the on-disk layout and its invariants."""

    def __init__(self, root: Path, layer_format: str | None = None) -> None:
        """`layer_format`: "dir" or "erofs" (None: $DSEC_LAYER_FORMAT, else "dir"); see ServerConfig.layer_format."""
        self.root = Path(root)
        self.layer_format = check_format(layer_format or os.environ.get("DSEC_LAYER_FORMAT") or "dir")
        self.root.mkdir(parents=True, exist_ok=True)
        self.workspace = Workspace(self.root)
        self.blobs = BlobStore(self.workspace)
        self.layers = LayerCache(self.workspace, self.blobs, self.layer_format)
        self.index = ImageIndex(self.workspace, self.blobs)
        self.blobs_dir, self.layers_dir, self.mounts_dir = self.blobs.dir, self.layers.layers_dir, self.layers.mounts_dir
        self.tmp_dir, self.locks_dir = self.workspace.tmp_dir, self.workspace.locks_dir
        self.sweep_tmp()

    def close(self) -> None:
        """Detach the erofs layer mounts no sandbox holds, then close the database."""
        self.unmount_unused()
        self.workspace.close()

    # ---- what spans the parts ---------------------------------------------------------------------

    def resolve(self, ref: str) -> ImageRootfs:
        """The overlay lower dirs (top-most first) and runtime config of `ref`, fetching lazy layers on first use."""
        with self.lock("gc", shared=True):
            record = self.inspect(ref)
            for layer in [layer for layer in record.layers if not self.has_layer(layer.diff_id)]:
                if self.has_blob(layer.blob_digest):  # e.g. the layer exists only in the other format
                    self.ensure_layer(layer.diff_id, layer.blob_digest, _no_source(layer.blob_digest))
                else:
                    fetch_layer(self, record, layer)  # lazy pull: layers come on first use
            self.index.mark_used(record.digest)
            with self.lock("mounts", shared=True) if self.layer_format == "erofs" else contextlib.nullcontext():
                lower = [self.layers.lower_dir(layer.diff_id) for layer in reversed(record.layers)]
            return ImageRootfs(reference=ref, digest=record.digest, lower_dirs=lower, config=record.config)

    def acquire(self, ref: str, holder_id: str) -> ImageRootfs:
        """Resolve `ref` and pin it for `holder_id` (a sandbox id) so prune never removes its layers."""
        # no prune, and no release detaching a layer mount, between resolving and pinning
        with self.lock("gc", shared=True), self.lock("mounts", shared=True):
            rootfs = self.resolve(ref)
            self.index.hold(holder_id, rootfs.digest)
        return rootfs

    def release(self, holder_id: str) -> None:
        """Unpin whatever `holder_id` acquired (idempotent; called at sandbox destroy and crash cleanup).

        With erofs layers, the layers its image no longer shares with another holder are unmounted.
        """
        self.index.unhold(holder_id)
        if self.layers.any_mounted():
            self.unmount_unused()

    def unmount_unused(self, keep: set[str] | None = None) -> list[str]:
        """Detach every erofs layer mount no holder needs (`keep`: hex diff_ids; default: the held layers).

        The reference count is the holds table: a layer stays mounted while a sandbox holds an image that uses
        it. A sandbox created without a hold keeps a detached layer alive inside its overlay until it ends.
        """
        with self.lock("mounts"):  # no acquire between computing what is held and detaching
            return self.layers.unmount_except(self.index.held_layers() if keep is None else keep)

    def import_oci_layout(self, path: Path, tag: str | None = None) -> ImageRecord:
        # prune must not free layers between extraction and the record
        with disk_errors(f"importing {path}"), self.lock("gc", shared=True):
            return import_oci_layout(self, Path(path), tag)

    def import_docker_archive(self, tar_path: Path, tag: str | None = None) -> ImageRecord:
        with disk_errors(f"importing {tar_path}"), self.lock("gc", shared=True):
            return import_docker_archive(self, Path(tar_path), tag)

    # ---- the parts' operations, for callers that hold only the store ------------------------------

    def lock(self, name: str, shared: bool = False) -> contextlib.AbstractContextManager[None]:
        return self.workspace.lock(name, shared)

    def new_tmp(self, suffix: str = "") -> Path:
        return self.workspace.new_tmp(suffix)

    def sweep_tmp(self) -> int:
        return self.workspace.sweep_tmp()

    def blob_path(self, digest: str) -> Path:
        return self.blobs.path(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blobs.has(digest)

    def put_blob_bytes(self, data: bytes, expected: str | None = None) -> str:
        return self.blobs.put_bytes(data, expected)

    def put_blob_stream(self, src: BinaryIO, expected: str | None = None, limit: int | None = None) -> tuple[str, int]:
        return self.blobs.put_stream(src, expected, limit)

    def read_blob(self, digest: str) -> bytes:
        return self.blobs.read(digest)

    def layer_path(self, diff_id: str) -> Path:
        return self.layers.layer_path(diff_id)

    def erofs_path(self, diff_id: str) -> Path:
        return self.layers.erofs_path(diff_id)

    def mount_path(self, diff_id: str) -> Path:
        return self.layers.mount_path(diff_id)

    def has_layer(self, diff_id: str) -> bool:
        return self.layers.has_layer(diff_id)

    def ensure_layer(
        self,
        diff_id: str,
        blob_digest: str | None,
        opener: Callable[[], contextlib.AbstractContextManager[BinaryIO]],
        limit: int | None = None,
        source: FileRegion | None = None,
    ) -> LayerInfo:
        return self.layers.ensure_layer(diff_id, blob_digest, opener, limit, source)

    def layer_rows(self) -> list[tuple[str, str, int, int, float]]:
        return self.layers.layer_rows()

    def drop_layer_row(self, diff_id: str) -> None:
        self.layers.drop_layer_row(diff_id)

    def add_image(self, manifest_bytes: bytes, config_bytes: bytes, tags: list[str], source: str = "") -> ImageRecord:
        return self.index.add_image(manifest_bytes, config_bytes, tags, source)

    def get(self, digest: str) -> ImageRecord:
        return self.index.get(digest)

    def tags(self) -> list[str]:
        return self.index.tags()

    def lookup(self, ref: str) -> str:
        return self.index.lookup(ref)

    def inspect(self, ref: str) -> ImageRecord:
        return self.index.inspect(ref)

    def list(self) -> list[ImageRecord]:
        return self.index.list()

    def source_of(self, digest: str) -> str:
        return self.index.source_of(digest)

    def tag(self, ref: str, new: str) -> ImageRecord:
        return self.index.tag(ref, new)

    def remove(self, ref: str) -> list[str]:
        return self.index.remove(ref)

    def delete_record(self, digest: str) -> None:
        self.index.delete_record(digest)

    def forget_layers_of(self, digest: str) -> None:
        self.index.forget_layers_of(digest)

    def layers_wanted(self, digest: str) -> bool:
        return self.index.layers_wanted(digest)

    def held_layers(self) -> set[str]:
        return self.index.held_layers()

    def holders(self) -> dict[str, str]:
        return self.index.holders()

    def cache_get(self, key: str) -> str | None:
        return self.index.cache_get(key)

    def cache_put(self, key: str, digest: str) -> None:
        self.index.cache_put(key, digest)


def _no_source(blob_digest: str) -> Callable[[], contextlib.AbstractContextManager[BinaryIO]]:
    """The opener for a layer whose blob is already stored: ensure_layer extracts from the blob and never calls it."""

    def opener() -> contextlib.AbstractContextManager[BinaryIO]:
        raise ImageNotFound(f"blob {blob_digest} vanished from the store: re-import or pull the image")

    return opener


# Re-exported: callers import the store's value types and helpers from here.
__all__ = ["ImageRecord", "LAYER_FORMATS", "LayerInfo", "LayerStore", "check_tag", "disk_errors"]
