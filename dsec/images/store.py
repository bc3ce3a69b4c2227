"""The node-local, content-addressed image store shared by every dsec server process on the machine.

Layout under `root` (= `ServerConfig().images_dir`):

    blobs/sha256/<hex>     OCI blobs (manifests, configs, layer tars) exactly as received
    layers/<diff hex>/     extracted layers, the overlay lower dirs every sandbox shares read-only (format dir)
    layers/<diff hex>.erofs  the same layer as one erofs image (format erofs)
    mounts/<diff hex>/     where an erofs layer is loop-mounted read-only, once per machine, while in use
    tmp/<pid>-<rand>       work in progress; renamed into place when complete, swept when its pid is dead
    locks/                 flock files: one per layer (single extraction) and `gc` (prune vs. users)
    store.db               SQLite (WAL): images, tags, layers, holders

Why this shape: a sandbox create must cost the same for a 10 MB and a 2 GB image, so layers are extracted
once and stacked by overlayfs; a kill -9 at any point leaves only a `tmp/` entry, never a half layer under
`layers/`, because every layer and blob becomes visible by a single rename after it was verified.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dsec.errors import DiskFull, DsecError, ImageNotFound, InvalidSpec, RuntimeFailure, SandboxStateError
from dsec.images import erofs, oci
from dsec.images.digest import CHUNK, HashingReader, check_digest, copy_hashing, hex_of, sha256_bytes
from dsec.images.extract import ExtractResult, FileRegion, extract_layer_file, extract_plain_region
from dsec.substrates.base import ImageConfig, ImageRootfs

LAYER_FORMATS = ("dir", "erofs")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    digest TEXT PRIMARY KEY, manifest TEXT NOT NULL, config TEXT NOT NULL,
    size INTEGER NOT NULL, created REAL NOT NULL, last_used REAL NOT NULL, source TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS tags (name TEXT PRIMARY KEY, digest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers (
    diff_id TEXT PRIMARY KEY, blob_digest TEXT NOT NULL, media_type TEXT NOT NULL,
    blob_size INTEGER NOT NULL, unpacked INTEGER NOT NULL, last_used REAL NOT NULL);
CREATE TABLE IF NOT EXISTS holds (holder TEXT PRIMARY KEY, digest TEXT NOT NULL, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS build_cache (key TEXT PRIMARY KEY, digest TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS evicted (digest TEXT PRIMARY KEY);
"""


@dataclass(frozen=True)
class LayerInfo:
    blob_digest: str
    diff_id: str
    media_type: str
    size: int  # blob bytes


@dataclass(frozen=True)
class ImageRecord:
    """One image in the store: its manifest digest, tags, layers (bottom first) and runtime config."""

    digest: str
    tags: list[str]
    config_digest: str
    layers: list[LayerInfo]
    size: int
    created: float
    last_used: float
    config: ImageConfig
    holders: int = 0


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_RE.match(tag) or tag.startswith("sha256:"):
        raise InvalidSpec(f"invalid image tag {tag!r}: use letters, digits and . _ / : @ + - (at most 255 characters)")
    return tag


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def disk_errors(what: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT into DiskFull and EIO into RuntimeFailure, with what to do next (the caller's temp files
    are already discarded, so nothing half-written is left visible)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left while {what}: free space or run `dsec images prune`") from exc
        if exc.errno == errno.EIO:
            raise RuntimeFailure(f"I/O error while {what}: the image store's disk failed; check it, retry") from exc
        raise


class LayerStore:
    """Process-safe layer store; see the module docstring for the on-disk layout and its invariants."""

    def __init__(self, root: Path, layer_format: str | None = None) -> None:
        """`layer_format`: "dir" or "erofs" (None: $DSEC_LAYER_FORMAT, else "dir"); see ServerConfig.layer_format."""
        self.root = Path(root)
        self.layer_format = layer_format or os.environ.get("DSEC_LAYER_FORMAT") or "dir"
        if self.layer_format not in LAYER_FORMATS:
            raise InvalidSpec(f"unknown layer_format {self.layer_format!r}: use one of {', '.join(LAYER_FORMATS)}")
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.layers_dir = self.root / "layers"
        self.mounts_dir = self.root / "mounts"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        for d in (self.blobs_dir, self.layers_dir, self.mounts_dir, self.tmp_dir, self.locks_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._db_lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "store.db", timeout=60, isolation_level=None, check_same_thread=False)
        with self._db_lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        self.sweep_tmp()

    def close(self) -> None:
        """Detach the erofs layer mounts no sandbox holds, then close the database."""
        self.unmount_unused()
        with self._db_lock:
            self._db.close()

    # ---- locking and temp space -------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str, shared: bool = False) -> Iterator[None]:
        """A cross-process flock on `locks/<name>` (released when the holder dies, so kill -9 cannot wedge it)."""
        with open(self.locks_dir / name, "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def new_tmp(self, suffix: str = "") -> Path:
        return self.tmp_dir / f"{os.getpid()}-{uuid.uuid4().hex}{suffix}"

    def sweep_tmp(self) -> int:
        """Remove work left by dead processes (kill -9 mid-pull or mid-extract); returns how many entries."""
        removed = 0
        for entry in self.tmp_dir.iterdir():
            pid_text = entry.name.split("-", 1)[0]
            if pid_text.isdigit() and _pid_alive(int(pid_text)):
                continue
            _remove_path(entry)
            removed += 1
        return removed

    # ---- database ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._db_lock:
            return self._db.execute(sql, args).fetchall()

    # ---- blobs ------------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / hex_of(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def put_blob_bytes(self, data: bytes, expected: str | None = None) -> str:
        digest = sha256_bytes(data)
        if expected is not None and digest != expected:
            raise InvalidSpec(f"blob digest mismatch: expected {expected}, got {digest}; the blob was not stored")
        path = self.blob_path(digest)
        if not path.exists():
            tmp = self.new_tmp(".blob")
            with disk_errors(f"storing blob {digest}"):
                try:
                    tmp.write_bytes(data)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
        return digest

    def put_blob_stream(self, src: BinaryIO, expected: str | None = None, limit: int | None = None) -> tuple[str, int]:
        """Stream `src` into the blob store (never all in memory), verifying `expected` before it becomes visible."""
        tmp = self.new_tmp(".blob")
        try:
            with disk_errors("storing a blob"), open(tmp, "wb") as out:
                reader = HashingReader(src, tee=out, limit=limit)
                reader.drain()
            if expected is not None and reader.digest != expected:
                raise InvalidSpec(f"blob digest mismatch: expected {expected}, got {reader.digest}; the blob was not stored")
            os.replace(tmp, self.blob_path(reader.digest))
            return reader.digest, reader.size
        finally:
            tmp.unlink(missing_ok=True)

    def read_blob(self, digest: str) -> bytes:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise ImageNotFound(f"blob {digest} is not in the store (pull or re-import the image)") from None

    # ---- layers -----------------------------------------------------------------------------------

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
        opener: Callable[[], contextlib.AbstractContextManager[BinaryIO]],
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
        with self.lock(f"layer-{hex_of(diff_id)}"):
            have_layer = self.has_layer(diff_id)
            known = self._query("SELECT blob_digest, media_type, blob_size FROM layers WHERE diff_id=?", (diff_id,))
            have_blob = blob_digest is not None and self.has_blob(blob_digest)
            if have_layer and known and (blob_digest is None or (known[0][0] == blob_digest and have_blob)):
                self._touch_layer(diff_id)
                return LayerInfo(known[0][0], diff_id, known[0][1], known[0][2])
            if have_layer:
                with opener() as src:
                    got, size = self.put_blob_stream(src, expected=blob_digest, limit=limit)
                compressed = self.blob_path(got).open("rb").read(2) == b"\x1f\x8b"
                info = LayerInfo(got, diff_id, oci.oci_layer_type(compressed), size)
                if not known:
                    self._record_layer(info, self._layer_bytes(diff_id))
                return info
            return self._extract_new(diff_id, blob_digest, opener, limit, keep_blob=not have_blob, source=source)

    def _extract_new(
        self, diff_id: str, blob_digest: str | None, opener, limit: int | None, keep_blob: bool, source: FileRegion | None
    ) -> LayerInfo:
        """Land the blob in `tmp/` (hashed on the way, rejected before extraction if it lies), extract it, rename.

        When the blob is already stored (verified when it was), the layer is extracted from it without
        calling `opener` at all.
        """
        work = self.new_tmp()
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
                    blob_file = self.blob_path(blob_digest)
                    result = extract_layer_file(blob_file, layer_tmp, blob_digest)
            if result.diff_id != diff_id:
                raise InvalidSpec(f"layer diff_id mismatch: config says {diff_id}, content is {result.diff_id}; not cached")
            if keep_blob:
                os.replace(blob_file, self.blob_path(result.blob_digest))
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
            _remove_path(work)

    def _layer_bytes(self, diff_id: str) -> int:
        if self.layer_format == "erofs":
            return self.erofs_path(diff_id).stat().st_size
        return _tree_size(self.layer_path(diff_id))

    def _record_layer(self, info: LayerInfo, unpacked: int) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO layers VALUES (?,?,?,?,?,?)",
                (info.diff_id, info.blob_digest, info.media_type, info.size, unpacked, time.time()),
            )

    def _touch_layer(self, diff_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE layers SET last_used=? WHERE diff_id=?", (time.time(), diff_id))

    # ---- image records ----------------------------------------------------------------------------

    def add_image(self, manifest_bytes: bytes, config_bytes: bytes, tags: list[str], source: str = "") -> ImageRecord:
        """Register an image whose layers are already in the store (or fetchable from its registry source)."""
        for tag in tags:
            check_tag(tag)
        manifest = oci.parse_manifest(manifest_bytes)
        config_digest = self.put_blob_bytes(config_bytes, expected=manifest.config.digest)
        config = oci.load_json(config_bytes, "image config")
        ids = oci.diff_ids(config)
        if len(ids) != len(manifest.layers):
            raise InvalidSpec(f"image config lists {len(ids)} diff_ids but the manifest has {len(manifest.layers)} layers")
        digest = self.put_blob_bytes(manifest_bytes)
        size = len(manifest_bytes) + len(config_bytes) + sum(layer.size for layer in manifest.layers)
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO images VALUES (?,?,?,?,?,?,?)",
                (digest, manifest_bytes.decode(), config_digest, size, now, now, source),
            )
            for tag in tags:
                db.execute("INSERT OR REPLACE INTO tags VALUES (?,?)", (tag, digest))
        return self.get(digest)

    def _record(self, row: tuple) -> ImageRecord:
        digest, manifest_text, config_digest, size, created, last_used = row[:6]
        manifest = oci.parse_manifest(manifest_text.encode())
        config = oci.load_json(self.read_blob(config_digest), "image config")
        ids = oci.diff_ids(config)
        tags = [r[0] for r in self._query("SELECT name FROM tags WHERE digest=? ORDER BY name", (digest,))]
        holders = self._query("SELECT COUNT(*) FROM holds WHERE digest=?", (digest,))[0][0]
        layers = [LayerInfo(d.digest, diff, d.media_type, d.size) for d, diff in zip(manifest.layers, ids)]
        return ImageRecord(digest, tags, config_digest, layers, size, created, last_used, oci.image_config(config), holders)

    def get(self, digest: str) -> ImageRecord:
        rows = self._query("SELECT * FROM images WHERE digest=?", (digest,))
        if not rows:
            raise ImageNotFound(f"image {digest} is not in the store; known tags: {', '.join(self.tags()) or '(none)'}")
        return self._record(rows[0])

    def tags(self) -> list[str]:
        return [r[0] for r in self._query("SELECT name FROM tags ORDER BY name")]

    def lookup(self, ref: str) -> str:
        """The manifest digest `ref` names: a tag (`name` = `name:latest`), a full digest or a unique digest prefix."""
        if not isinstance(ref, str) or not ref or len(ref) > 512:
            raise InvalidSpec(f"invalid image reference {ref!r}")
        if ref.startswith("sha256:"):
            prefix = ref.split(":", 1)[1]
            if not re.fullmatch(r"[0-9a-f]{4,64}", prefix):
                raise InvalidSpec(f"invalid image digest {ref!r}: expected sha256: and 4 to 64 lowercase hex digits")
            rows = self._query("SELECT digest FROM images WHERE digest LIKE ?", (f"sha256:{prefix}%",))
            if len(rows) == 1:
                return rows[0][0]
            if len(rows) > 1:
                raise InvalidSpec(f"image digest prefix {ref!r} is ambiguous ({len(rows)} images): give more digits")
        else:
            candidates = [ref, f"{ref}:latest"] if ":" not in ref.rsplit("/", 1)[-1] else [ref]
            if ref.endswith(":latest"):
                candidates.append(ref[: -len(":latest")])
            for name in candidates:
                rows = self._query("SELECT digest FROM tags WHERE name=?", (name,))
                if rows:
                    return rows[0][0]
        raise ImageNotFound(
            f"image {ref!r} not found; known tags: {', '.join(self.tags()) or '(none)'} "
            "(import, build or pull it first: `dsec images ls` lists what is here)"
        )

    def inspect(self, ref: str) -> ImageRecord:
        return self.get(self.lookup(ref))

    def list(self) -> list[ImageRecord]:
        return [self._record(row) for row in self._query("SELECT * FROM images ORDER BY created")]

    def resolve(self, ref: str) -> ImageRootfs:
        """The overlay lower dirs (top-most first) and runtime config of `ref`, fetching lazy layers on first use."""
        with self.lock("gc", shared=True):
            record = self.inspect(ref)
            missing = [layer for layer in record.layers if not self.has_layer(layer.diff_id)]
            for layer in missing:
                if self.has_blob(layer.blob_digest):  # e.g. the layer exists only in the other format
                    self.ensure_layer(layer.diff_id, layer.blob_digest, _no_source(layer.blob_digest))
                else:
                    from dsec.images.registry import fetch_layer  # lazy pull: layers come on first use

                    fetch_layer(self, record, layer)
            with self._tx() as db:
                db.execute("UPDATE images SET last_used=? WHERE digest=?", (time.time(), record.digest))
                db.execute("DELETE FROM evicted WHERE digest=?", (record.digest,))
            if self.layer_format == "erofs":
                with self.lock("mounts", shared=True):
                    lower = [self._mounted(layer.diff_id) for layer in reversed(record.layers)]
            else:
                lower = [self.layer_path(layer.diff_id) for layer in reversed(record.layers)]
            return ImageRootfs(reference=ref, digest=record.digest, lower_dirs=lower, config=record.config)

    def _mounted(self, diff_id: str) -> Path:
        """The read-only mount point of an erofs layer, mounting it if this is its first use on the machine."""
        target = self.mount_path(diff_id)
        if erofs.is_mounted(target):
            return target
        with self.lock(f"layer-{hex_of(diff_id)}"):
            if not erofs.is_mounted(target):
                erofs.mount_layer(self.erofs_path(diff_id), target, f"layer {diff_id}")
        return target

    def held_layers(self) -> set[str]:
        """Hex diff_ids of every layer some holder (a live sandbox) needs."""
        wanted: set[str] = set()
        for (digest,) in self._query("SELECT DISTINCT digest FROM holds"):
            with contextlib.suppress(DsecError):
                wanted.update(hex_of(layer.diff_id) for layer in self.get(digest).layers)
        return wanted

    def unmount_unused(self, keep: set[str] | None = None) -> list[str]:
        """Detach every erofs layer mount no holder needs (`keep`: hex diff_ids; default: the held layers).

        The reference count is the holds table: a layer stays mounted while a sandbox holds an image that uses
        it. A sandbox created without a hold keeps a detached layer alive inside its overlay until it ends.
        """
        detached = []
        with self.lock("mounts"):  # no acquire between computing what is held and detaching
            keep = self.held_layers() if keep is None else keep
            for target in list(self.mounts_dir.iterdir()):
                if target.name in keep:
                    continue
                with self.lock(f"layer-{target.name}"):
                    erofs.unmount_layer(target)
                detached.append(target.name)
        return detached

    def source_of(self, digest: str) -> str:
        rows = self._query("SELECT source FROM images WHERE digest=?", (digest,))
        return rows[0][0] if rows else ""

    def tag(self, ref: str, new: str) -> ImageRecord:
        check_tag(new)
        digest = self.lookup(ref)
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO tags VALUES (?,?)", (new, digest))
        return self.get(digest)

    def remove(self, ref: str) -> list[str]:
        """Untag (`ref` is a tag) or delete (`ref` is a digest, or its last tag) an image record.

        Layers and blobs are freed by `prune`; an image held by a live sandbox is refused, not yanked.
        Returns the digests of records deleted.
        """
        digest = self.lookup(ref)
        by_digest = ref.startswith("sha256:")
        with self._tx() as db:
            if not by_digest:
                name = next(n for n in (ref, f"{ref}:latest", ref.removesuffix(":latest")) if db.execute(
                    "SELECT 1 FROM tags WHERE name=?", (n,)).fetchone())
                db.execute("DELETE FROM tags WHERE name=?", (name,))
                if db.execute("SELECT 1 FROM tags WHERE digest=?", (digest,)).fetchone():
                    return []
            holders = [r[0] for r in db.execute("SELECT holder FROM holds WHERE digest=?", (digest,))]
            if holders:
                if not by_digest:
                    return []  # tag gone; the record stays until its sandboxes end
                raise SandboxStateError(
                    f"image {digest} is in use by sandboxes {', '.join(holders[:5])}: destroy them first"
                )
            db.execute("DELETE FROM tags WHERE digest=?", (digest,))
            db.execute("DELETE FROM images WHERE digest=?", (digest,))
        return [digest]

    def delete_record(self, digest: str) -> None:
        """Forget an image (tags, build-cache entries); its layers go at the next prune. Caller holds the gc lock."""
        with self._tx() as db:
            for table in ("tags", "images", "build_cache", "evicted"):
                db.execute(f"DELETE FROM {table} WHERE digest=?", (digest,))

    def forget_layers_of(self, digest: str) -> None:
        """Let prune free a pulled image's layers while keeping its record: they are re-fetched on next use."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO evicted VALUES (?)", (digest,))

    def layers_wanted(self, digest: str) -> bool:
        return not self._query("SELECT 1 FROM evicted WHERE digest=?", (digest,))

    def drop_layer_row(self, diff_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM layers WHERE diff_id=?", (diff_id,))

    # ---- reference counts from sandboxes ----------------------------------------------------------

    def acquire(self, ref: str, holder_id: str) -> ImageRootfs:
        """Resolve `ref` and pin it for `holder_id` (a sandbox id) so prune never removes its layers."""
        # no prune, and no release detaching a layer mount, between resolving and pinning
        with self.lock("gc", shared=True), self.lock("mounts", shared=True):
            rootfs = self.resolve(ref)
            with self._tx() as db:
                db.execute("INSERT OR REPLACE INTO holds VALUES (?,?,?)", (holder_id, rootfs.digest, time.time()))
        return rootfs

    def release(self, holder_id: str) -> None:
        """Unpin whatever `holder_id` acquired (idempotent; called at sandbox destroy and crash cleanup).

        With erofs layers, the layers its image no longer shares with another holder are unmounted.
        """
        with self._tx() as db:
            db.execute("DELETE FROM holds WHERE holder=?", (holder_id,))
        if any(self.mounts_dir.iterdir()):
            self.unmount_unused()

    def holders(self) -> dict[str, str]:
        return dict(self._query("SELECT holder, digest FROM holds"))

    # ---- build cache ------------------------------------------------------------------------------

    def cache_get(self, key: str) -> str | None:
        rows = self._query("SELECT digest FROM build_cache WHERE key=?", (key,))
        if rows and self._query("SELECT 1 FROM images WHERE digest=?", (rows[0][0],)):
            return rows[0][0]
        return None

    def cache_put(self, key: str, digest: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO build_cache VALUES (?,?,?)", (key, digest, time.time()))

    # ---- accounting -------------------------------------------------------------------------------

    def layer_rows(self) -> list[tuple[str, str, int, int, float]]:
        """(diff_id, blob_digest, blob_size, unpacked, last_used) for every extracted layer."""
        return self._query("SELECT diff_id, blob_digest, blob_size, unpacked, last_used FROM layers")

    def manifest_json(self, digest: str) -> dict:
        return json.loads(self.read_blob(digest))

    def import_oci_layout(self, path: Path, tag: str | None = None) -> ImageRecord:
        from dsec.images.importers import import_oci_layout

        # prune must not free layers between extraction and the record
        with disk_errors(f"importing {path}"), self.lock("gc", shared=True):
            return import_oci_layout(self, Path(path), tag)

    def import_docker_archive(self, tar_path: Path, tag: str | None = None) -> ImageRecord:
        from dsec.images.importers import import_docker_archive

        with disk_errors(f"importing {tar_path}"), self.lock("gc", shared=True):
            return import_docker_archive(self, Path(tar_path), tag)


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


def _no_source(blob_digest: str) -> Callable[[], contextlib.AbstractContextManager[BinaryIO]]:
    """The opener for a layer whose blob is already stored: ensure_layer extracts from the blob and never calls it."""

    def opener() -> contextlib.AbstractContextManager[BinaryIO]:
        raise ImageNotFound(f"blob {blob_digest} vanished from the store: re-import or pull the image")

    return opener


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


__all__ = ["CHUNK", "DsecError", "ImageRecord", "LayerInfo", "LayerStore", "check_tag", "disk_errors"]
