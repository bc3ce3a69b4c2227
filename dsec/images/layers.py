"""The layer cache: each layer extracted once per machine, the overlay lower dirs every sandbox shares read-only.

    layers/<diff hex>/       an extracted layer (format dir)
    layers/<diff hex>.erofs  the same layer as one erofs image (format erofs)
    mounts/<diff hex>/       where an erofs layer is loop-mounted read-only, once per machine, while in use

Keyed by diff_id (the uncompressed content), so two images that ship one layer compressed differently share it.
A layer appears by a single rename after both its blob and diff_id digests were verified; a kill -9 mid-way
leaves only a `tmp/` entry. Which layers are still wanted is the image index's business: `unmount_unused` is told.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from dsec.errors import InvalidSpec
from dsec.images import erofs, oci
from dsec.images.blobs import BlobStore, disk_errors
from dsec.images.digest import check_digest, copy_hashing, hex_of
from dsec.images.extract import ExtractResult, FileRegion, extract_layer_file, extract_plain_region
from dsec.images.types import LayerInfo
from dsec.images.workspace import Workspace, remove_path

LAYER_FORMATS = ("dir", "erofs")
Opener = Callable[[], contextlib.AbstractContextManager[BinaryIO]]


def check_format(layer_format: str) -> str:
    if layer_format not in LAYER_FORMATS:
        raise InvalidSpec(f"unknown layer_format {layer_format!r}: use one of {', '.join(LAYER_FORMATS)}")
    return layer_format


class LayerCache:
    def __init__(self, workspace: Workspace, blobs: BlobStore, layer_format: str) -> None:
        self._ws = workspace
        self._blobs = blobs
        self.layer_format = check_format(layer_format)
        self.layers_dir = workspace.root / "layers"
        self.mounts_dir = workspace.root / "mounts"
        for d in (self.layers_dir, self.mounts_dir):
            d.mkdir(parents=True, exist_ok=True)

    def layer_path(self, diff_id: str) -> Path:
        return self.layers_dir / hex_of(diff_id)

    def erofs_path(self, diff_id: str) -> Path:
        return self.layers_dir / f"{hex_of(diff_id)}.erofs"

    def mount_path(self, diff_id: str) -> Path:
        return self.mounts_dir / hex_of(diff_id)

    def has_layer(self, diff_id: str) -> bool:
        """Whether the layer exists in this store's format (a layer in the other format is rebuilt from its blob)."""
        if self.layer_format == "erofs":
            return self.erofs_path(diff_id).is_file()
        return self.layer_path(diff_id).is_dir()

    def ensure_layer(
        self,
        diff_id: str,
        blob_digest: str | None,
        opener: Opener,
        limit: int | None = None,
        source: FileRegion | None = None,
    ) -> LayerInfo:
        """Make `layers/<diff_id>` and its blob exist, extracting at most once machine-wide (dedup by diff_id).

        `opener` yields the layer blob's bytes; it is only called when something is missing. `source`, when the
        blob lies in a local file, lets an uncompressed layer be extracted straight from it while the blob is
        landed and hashed on a second core. Both digests are verified before anything is renamed into place, so
        a corrupt or lying source leaves no trace.
        """
        check_digest(diff_id)
        with self._ws.lock(f"layer-{hex_of(diff_id)}"):
            have_layer = self.has_layer(diff_id)
            known = self._ws.query("SELECT blob_digest, media_type, blob_size FROM layers WHERE diff_id=?", (diff_id,))
            have_blob = blob_digest is not None and self._blobs.has(blob_digest)
            if have_layer and known and (blob_digest is None or (known[0][0] == blob_digest and have_blob)):
                self._touch_layer(diff_id)
                return LayerInfo(known[0][0], diff_id, known[0][1], known[0][2])
            if have_layer:
                with opener() as src:
                    got, size = self._blobs.put_stream(src, expected=blob_digest, limit=limit)
                compressed = self._blobs.path(got).open("rb").read(2) == b"\x1f\x8b"
                info = LayerInfo(got, diff_id, oci.oci_layer_type(compressed), size)
                if not known:
                    self._record_layer(info, self._layer_bytes(diff_id))
                return info
            return self._extract_new(diff_id, blob_digest, opener, limit, keep_blob=not have_blob, source=source)

    def _extract_new(
        self, diff_id: str, blob_digest: str | None, opener: Opener, limit: int | None, keep_blob: bool,
        source: FileRegion | None,
    ) -> LayerInfo:
        """Land the blob in `tmp/` (hashed on the way, rejected before extraction if it lies), extract it, rename.

        When the blob is already stored (verified when it was), the layer is extracted from it without
        calling `opener` at all.
        """
        work = self._ws.new_tmp()
        work.mkdir()
        layer_tmp = work / "layer"
        layer_tmp.mkdir()
        try:
            with disk_errors(f"extracting layer {diff_id}"):
                blob_file = work / "blob"
                if keep_blob and source is not None and not source.is_gzip():
                    result = _extract_while_landing(source, layer_tmp, blob_file, limit)
                    if blob_digest is not None and result.blob_digest != blob_digest:
                        raise InvalidSpec(f"layer blob digest mismatch: expected {blob_digest}, got {result.blob_digest}; not cached")
                elif keep_blob:
                    with opener() as src:
                        got, _size = copy_hashing(src, blob_file, limit)
                    if blob_digest is not None and got != blob_digest:
                        raise InvalidSpec(f"layer blob digest mismatch: expected {blob_digest}, got {got}; not cached")
                    result = extract_layer_file(blob_file, layer_tmp, got)
                else:
                    assert blob_digest is not None
                    blob_file = self._blobs.path(blob_digest)
                    result = extract_layer_file(blob_file, layer_tmp, blob_digest)
            if result.diff_id != diff_id:
                raise InvalidSpec(f"layer diff_id mismatch: config says {diff_id}, content is {result.diff_id}; not cached")
            if keep_blob:
                os.replace(blob_file, self._blobs.path(result.blob_digest))
            os.chmod(layer_tmp, os.stat(layer_tmp).st_mode | 0o755)
            if self.layer_format == "erofs":
                image_tmp = work / "layer.erofs"
                with disk_errors(f"packing layer {diff_id}"):
                    erofs.build_image(layer_tmp, image_tmp, f"layer {diff_id}")
                os.rename(image_tmp, self.erofs_path(diff_id))
            else:
                os.rename(layer_tmp, self.layer_path(diff_id))
            info = LayerInfo(result.blob_digest, diff_id, oci.oci_layer_type(result.compressed), result.blob_size)
            self._record_layer(info, self._layer_bytes(diff_id) if self.layer_format == "erofs" else result.unpacked_bytes)
            return info
        finally:
            remove_path(work)

    def _layer_bytes(self, diff_id: str) -> int:
        if self.layer_format == "erofs":
            return self.erofs_path(diff_id).stat().st_size
        return _tree_size(self.layer_path(diff_id))

    def _record_layer(self, info: LayerInfo, unpacked: int) -> None:
        with self._ws.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO layers VALUES (?,?,?,?,?,?)",
                (info.diff_id, info.blob_digest, info.media_type, info.size, unpacked, time.time()),
            )

    def _touch_layer(self, diff_id: str) -> None:
        with self._ws.tx() as db:
            db.execute("UPDATE layers SET last_used=? WHERE diff_id=?", (time.time(), diff_id))

    def lower_dir(self, diff_id: str) -> Path:
        """The directory an overlay stacks for this layer: the extracted dir, or the erofs image's mount point
        (mounting it if this is its first use on the machine). Callers hold the `mounts` lock shared for erofs."""
        if self.layer_format != "erofs":
            return self.layer_path(diff_id)
        target = self.mount_path(diff_id)
        if erofs.is_mounted(target):
            return target
        with self._ws.lock(f"layer-{hex_of(diff_id)}"):
            if not erofs.is_mounted(target):
                erofs.mount_layer(self.erofs_path(diff_id), target, f"layer {diff_id}")
        return target

    def unmount_except(self, keep: set[str]) -> list[str]:
        """Detach every erofs layer mount whose hex diff_id is not in `keep`; the caller holds the `mounts` lock."""
        detached = []
        for target in list(self.mounts_dir.iterdir()):
            if target.name in keep:
                continue
            with self._ws.lock(f"layer-{target.name}"):
                erofs.unmount_layer(target)
            detached.append(target.name)
        return detached

    def any_mounted(self) -> bool:
        return any(self.mounts_dir.iterdir())

    def drop_layer_row(self, diff_id: str) -> None:
        with self._ws.tx() as db:
            db.execute("DELETE FROM layers WHERE diff_id=?", (diff_id,))

    def layer_rows(self) -> list[tuple[str, str, int, int, float]]:
        """(diff_id, blob_digest, blob_size, unpacked, last_used) for every extracted layer."""
        return self._ws.query("SELECT diff_id, blob_digest, blob_size, unpacked, last_used FROM layers")


def _extract_while_landing(source: FileRegion, dest: Path, blob_file: Path, limit: int | None) -> ExtractResult:
    """Extract the plain tar in `source` into `dest` while a second thread copies and hashes it into `blob_file`.

    Two cores: the hash (hashlib releases the GIL) and blob write overlap the in-kernel copies of extraction.
    Nothing is visible until the caller has checked the digest, so a lying source still leaves no trace.
    """

    def land() -> tuple[str, int]:
        with open(source.path, "rb") as fh:
            fh.seek(source.offset)
            return copy_hashing(_Limited(fh, source.size), blob_file, limit)

    with ThreadPoolExecutor(1, thread_name_prefix="dsec-land") as pool:
        landing = pool.submit(land)
        try:
            unpacked = extract_plain_region(source, dest)
        except BaseException:
            with contextlib.suppress(BaseException):
                landing.result()
            raise
        digest, size = landing.result()
    return ExtractResult(digest, size, digest, unpacked, False)


class _Limited:
    """At most `size` bytes of `raw` (a docker-save member ends where the next entry begins)."""

    def __init__(self, raw: BinaryIO, size: int) -> None:
        self._raw, self._left = raw, size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._raw.read(n) if n else b""
        self._left -= len(data)
        return data


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
