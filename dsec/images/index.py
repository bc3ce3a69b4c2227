"""The image index: image records (manifest + config, by manifest digest), tags, sandbox holds, the build cache
and which pulled images had their layers evicted. Rows only; the manifests and configs live in the blob store."""

from __future__ import annotations

import contextlib
import re
import time

from dsec.errors import DsecError, ImageNotFound, InvalidSpec, SandboxStateError
from dsec.images import oci
from dsec.images.blobs import BlobStore
from dsec.images.digest import hex_of
from dsec.images.types import ImageRecord, LayerInfo
from dsec.images.workspace import Workspace

TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$")


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_RE.match(tag) or tag.startswith("sha256:"):
        raise InvalidSpec(f"invalid image tag {tag!r}: use letters, digits and . _ / : @ + - (at most 255 characters)")
    return tag


class ImageIndex:
    def __init__(self, workspace: Workspace, blobs: BlobStore) -> None:
        self._ws = workspace
        self._blobs = blobs

    # ---- image records ----------------------------------------------------------------------------

    def add_image(self, manifest_bytes: bytes, config_bytes: bytes, tags: list[str], source: str = "") -> ImageRecord:
        """Register an image whose layers are already in the store (or fetchable from its registry source)."""
        for tag in tags:
            check_tag(tag)
        manifest = oci.parse_manifest(manifest_bytes)
        config_digest = self._blobs.put_bytes(config_bytes, expected=manifest.config.digest)
        config = oci.load_json(config_bytes, "image config")
        ids = oci.diff_ids(config)
        if len(ids) != len(manifest.layers):
            raise InvalidSpec(f"image config lists {len(ids)} diff_ids but the manifest has {len(manifest.layers)} layers")
        digest = self._blobs.put_bytes(manifest_bytes)
        size = len(manifest_bytes) + len(config_bytes) + sum(layer.size for layer in manifest.layers)
        now = time.time()
        with self._ws.tx() as db:
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
        config = oci.load_json(self._blobs.read(config_digest), "image config")
        ids = oci.diff_ids(config)
        tags = [r[0] for r in self._ws.query("SELECT name FROM tags WHERE digest=? ORDER BY name", (digest,))]
        holders = self._ws.query("SELECT COUNT(*) FROM holds WHERE digest=?", (digest,))[0][0]
        layers = [LayerInfo(d.digest, diff, d.media_type, d.size) for d, diff in zip(manifest.layers, ids)]
        return ImageRecord(digest, tags, config_digest, layers, size, created, last_used, oci.image_config(config), holders)

    def get(self, digest: str) -> ImageRecord:
        rows = self._ws.query("SELECT * FROM images WHERE digest=?", (digest,))
        if not rows:
            raise ImageNotFound(f"image {digest} is not in the store; known tags: {', '.join(self.tags()) or '(none)'}")
        return self._record(rows[0])

    def tags(self) -> list[str]:
        return [r[0] for r in self._ws.query("SELECT name FROM tags ORDER BY name")]

    def lookup(self, ref: str) -> str:
        """The manifest digest `ref` names: a tag (`name` = `name:latest`), a full digest or a unique digest prefix."""
        if not isinstance(ref, str) or not ref or len(ref) > 512:
            raise InvalidSpec(f"invalid image reference {ref!r}")
        if ref.startswith("sha256:"):
            prefix = ref.split(":", 1)[1]
            if not re.fullmatch(r"[0-9a-f]{4,64}", prefix):
                raise InvalidSpec(f"invalid image digest {ref!r}: expected sha256: and 4 to 64 lowercase hex digits")
            rows = self._ws.query("SELECT digest FROM images WHERE digest LIKE ?", (f"sha256:{prefix}%",))
            if len(rows) == 1:
                return rows[0][0]
            if len(rows) > 1:
                raise InvalidSpec(f"image digest prefix {ref!r} is ambiguous ({len(rows)} images): give more digits")
        else:
            candidates = [ref, f"{ref}:latest"] if ":" not in ref.rsplit("/", 1)[-1] else [ref]
            if ref.endswith(":latest"):
                candidates.append(ref[: -len(":latest")])
            for name in candidates:
                rows = self._ws.query("SELECT digest FROM tags WHERE name=?", (name,))
                if rows:
                    return rows[0][0]
        raise ImageNotFound(
            f"image {ref!r} not found; known tags: {', '.join(self.tags()) or '(none)'} "
            "(import, build or pull it first: `dsec images ls` lists what is here)"
        )

    def inspect(self, ref: str) -> ImageRecord:
        return self.get(self.lookup(ref))

    def list(self) -> list[ImageRecord]:
        return [self._record(row) for row in self._ws.query("SELECT * FROM images ORDER BY created")]

    def mark_used(self, digest: str) -> None:
        """A sandbox is about to use the image: LRU order for eviction, and its layers are wanted again."""
        with self._ws.tx() as db:
            db.execute("UPDATE images SET last_used=? WHERE digest=?", (time.time(), digest))
            db.execute("DELETE FROM evicted WHERE digest=?", (digest,))

    def source_of(self, digest: str) -> str:
        rows = self._ws.query("SELECT source FROM images WHERE digest=?", (digest,))
        return rows[0][0] if rows else ""

    def tag(self, ref: str, new: str) -> ImageRecord:
        check_tag(new)
        digest = self.lookup(ref)
        with self._ws.tx() as db:
            db.execute("INSERT OR REPLACE INTO tags VALUES (?,?)", (new, digest))
        return self.get(digest)

    def remove(self, ref: str) -> list[str]:
        """Untag (`ref` is a tag) or delete (`ref` is a digest, or its last tag) an image record.

        Layers and blobs are freed by `prune`; an image held by a live sandbox is refused, not yanked.
        Returns the digests of records deleted.
        """
        digest = self.lookup(ref)
        by_digest = ref.startswith("sha256:")
        with self._ws.tx() as db:
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
        with self._ws.tx() as db:
            for table in ("tags", "images", "build_cache", "evicted"):
                db.execute(f"DELETE FROM {table} WHERE digest=?", (digest,))

    def forget_layers_of(self, digest: str) -> None:
        """Let prune free a pulled image's layers while keeping its record: they are re-fetched on next use."""
        with self._ws.tx() as db:
            db.execute("INSERT OR IGNORE INTO evicted VALUES (?)", (digest,))

    def layers_wanted(self, digest: str) -> bool:
        return not self._ws.query("SELECT 1 FROM evicted WHERE digest=?", (digest,))

    # ---- reference counts from sandboxes ----------------------------------------------------------

    def hold(self, holder_id: str, digest: str) -> None:
        with self._ws.tx() as db:
            db.execute("INSERT OR REPLACE INTO holds VALUES (?,?,?)", (holder_id, digest, time.time()))

    def unhold(self, holder_id: str) -> None:
        with self._ws.tx() as db:
            db.execute("DELETE FROM holds WHERE holder=?", (holder_id,))

    def holders(self) -> dict[str, str]:
        return dict(self._ws.query("SELECT holder, digest FROM holds"))

    def held_layers(self) -> set[str]:
        """Hex diff_ids of every layer some holder (a live sandbox) needs."""
        wanted: set[str] = set()
        for (digest,) in self._ws.query("SELECT DISTINCT digest FROM holds"):
            with contextlib.suppress(DsecError):
                wanted.update(hex_of(layer.diff_id) for layer in self.get(digest).layers)
        return wanted

    # ---- build cache ------------------------------------------------------------------------------

    def cache_get(self, key: str) -> str | None:
        rows = self._ws.query("SELECT digest FROM build_cache WHERE key=?", (key,))
        if rows and self._ws.query("SELECT 1 FROM images WHERE digest=?", (rows[0][0],)):
            return rows[0][0]
        return None

    def cache_put(self, key: str, digest: str) -> None:
        with self._ws.tx() as db:
            db.execute("INSERT OR REPLACE INTO build_cache VALUES (?,?,?)", (key, digest, time.time()))
