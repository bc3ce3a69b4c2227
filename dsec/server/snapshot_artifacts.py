"""Snapshots as OCI artifacts: pushed to a registry on one node, pulled and restored on another.

Format: an OCI image manifest with `artifactType` ARTIFACT_TYPE. Its config blob (CONFIG_TYPE) is the snapshot's
metadata plus its file list; each layer (CHUNK_TYPE) is one zstd-compressed CHUNK_BYTES piece of one file of the
snapshot directory. Why file-aligned chunks and not one tar: a chunk's digest depends only on those bytes, so what
two snapshots share (a VM's base disk and initramfs, the zero runs of a sparse disk or of guest memory) is one blob,
uploaded once and deduplicated by the registry; and the pull side writes files by validated name and offset, with
no archive extraction to defend. A snapshot's base image is pushed to the same repository by digest
(`host/repo@sha256:…`); a node that lacks it pulls it from there.

Pull is all or nothing: every blob is verified against its digest (and every chunk against its length) before the
snapshot is published under a fresh id, owned by the puller's tenant; any failure discards it, so a bad or
interrupted pull leaves nothing visible.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import zstandard

from dsec.errors import ImageNotFound, InvalidSpec
from dsec.images import oci, registry
from dsec.images.digest import CHUNK, sha256_bytes
from dsec.images.store import LayerStore
from dsec.models import PushedSnapshot
from dsec.server.snapshots import SnapshotStore
from dsec.substrates.vm import portable

ARTIFACT_TYPE = "application/vnd.dsec.snapshot.v1"
CONFIG_TYPE = "application/vnd.dsec.snapshot.config.v1+json"
CHUNK_TYPE = "application/vnd.dsec.snapshot.chunk.v1+zstd"
CHUNK_BYTES = 32 << 20
ZSTD_LEVEL = 3  # deterministic for the same input and level: the same chunk is the same blob
MAX_FILES = 64
MAX_FILE_BYTES = 1 << 40
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# What a snapshot's metadata keeps across nodes; the tenant, id and owner are the pulling node's to set.
PORTABLE_META = ("sandbox_id", "name", "kind", "created_at", "spec", "image")


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while piece := fh.read(CHUNK_BYTES):
            yield piece


def _files(data: Path) -> dict[str, Path]:
    """The snapshot's files by the name they travel under: its own (flat, regular) plus the substrate's extras."""
    files: dict[str, Path] = {}
    for entry in sorted(data.iterdir()):
        if not entry.is_file() or entry.is_symlink() or not _FILE_NAME.fullmatch(entry.name):
            raise InvalidSpec(f"snapshot file {entry.name!r} cannot be pushed: only plain files travel")
        files[entry.name] = entry
    return files | portable.extra_files(data)


def push(snapshots: SnapshotStore, images: LayerStore, meta: dict, ref: str) -> PushedSnapshot:
    """Push the published snapshot `meta` as `ref` (host/repo[:tag]), reading it as a restore does."""
    remote = registry.RemoteRef.parse(ref)
    if remote.digest:
        raise InvalidSpec(f"push to a tag, not a digest: {ref!r} (the digest is what the push returns)")
    client = registry.RegistryClient(remote.host)
    image_digest = registry.push(images, meta["image"], f"{remote.host}/{remote.repo}@{meta['image']}")
    uploaded = present = sent = 0
    layers: list[dict] = []
    seen: set[str] = set()
    files: list[dict] = []
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    with snapshots.reading(meta["snapshot_id"]) as data:
        # one upload at a time goes through this file beside the snapshot's data (it goes with the snapshot)
        spool = data.parent / f".push-{secrets.token_hex(6)}"
        try:
            for name, path in _files(data).items():
                digests, size = [], 0
                for piece in _chunks(path):
                    blob = compressor.compress(piece)
                    digest = sha256_bytes(blob)
                    digests.append(digest)
                    size += len(piece)
                    if digest in seen:
                        continue
                    seen.add(digest)
                    layers.append({"mediaType": CHUNK_TYPE, "digest": digest, "size": len(blob)})
                    if registry.blob_exists(client, remote.repo, digest):
                        present += 1
                        continue
                    spool.write_bytes(blob)
                    registry.upload_blob(client, remote.repo, digest, spool)
                    uploaded, sent = uploaded + 1, sent + len(blob)
                files.append({"name": name, "size": size, "chunks": digests})
            config = json.dumps({"snapshot": {k: meta[k] for k in PORTABLE_META if k in meta}, "files": files,
                                 "chunk_bytes": CHUNK_BYTES}, sort_keys=True).encode()
            config_digest = sha256_bytes(config)
            if not registry.blob_exists(client, remote.repo, config_digest):
                spool.write_bytes(config)
                registry.upload_blob(client, remote.repo, config_digest, spool)
                uploaded, sent = uploaded + 1, sent + len(config)
        finally:
            spool.unlink(missing_ok=True)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": oci.MT_MANIFEST, "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": len(config)},
        "layers": layers,
        "annotations": {"dev.dsec.snapshot.image": image_digest},
    }, sort_keys=True).encode()
    with client.request("PUT", f"/v2/{remote.repo}/manifests/{remote.tag}", body=manifest,
                        headers={"Content-Type": oci.MT_MANIFEST}, ok=(201,)):
        pass
    return PushedSnapshot(digest=sha256_bytes(manifest), image_digest=image_digest, blobs_uploaded=uploaded,
                          blobs_present=present, bytes_uploaded=sent)


def _check_config(raw: dict, layer_digests: set[str]) -> tuple[dict, list[dict]]:
    """The pulled config's snapshot metadata and file list, rejected unless every name and size is sane."""
    snapshot, files = raw.get("snapshot"), raw.get("files")
    if not isinstance(snapshot, dict) or not isinstance(files, list) or len(files) > MAX_FILES:
        raise InvalidSpec("snapshot artifact config lacks its snapshot metadata or file list: rejected")
    if raw.get("chunk_bytes") != CHUNK_BYTES or not isinstance(snapshot.get("image"), str):
        raise InvalidSpec("snapshot artifact config has an unknown chunk size or no base image: rejected")
    names: set[str] = set()
    for entry in files:
        name, size, chunks = entry.get("name"), entry.get("size"), entry.get("chunks")
        if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or name in names:
            raise InvalidSpec(f"snapshot artifact names an invalid or repeated file {name!r}: rejected")
        if not isinstance(size, int) or not 0 <= size <= MAX_FILE_BYTES or not isinstance(chunks, list):
            raise InvalidSpec(f"snapshot artifact file {name!r} has an invalid size or chunk list: rejected")
        if len(chunks) != -(-size // CHUNK_BYTES) or not set(chunks) <= layer_digests:
            raise InvalidSpec(f"snapshot artifact file {name!r} does not match the manifest's chunks: rejected")
        names.add(name)
    return snapshot, files


def _ensure_image(images: LayerStore, remote: registry.RemoteRef, digest: str) -> None:
    """The snapshot's base image on this node: present, or pulled (lazily) from the artifact's repository."""
    try:
        images.inspect(digest)
    except ImageNotFound:
        registry.pull(images, f"{remote.host}/{remote.repo}@{digest}", tag=f"{remote.host}/{remote.repo}@{digest}")


def _fetch(client: registry.RegistryClient, repo: str, digest: str, size: int, dest: Path) -> bytes:
    """A chunk blob downloaded and verified against its digest."""
    registry.download_blob(client, repo, digest, size, dest)
    hasher = hashlib.sha256()
    with open(dest, "rb") as fh:
        while piece := fh.read(CHUNK):
            hasher.update(piece)
    if "sha256:" + hasher.hexdigest() != digest:
        raise InvalidSpec(f"snapshot chunk {digest} failed verification (its bytes hash differently): rejected")
    blob = dest.read_bytes()
    dest.unlink()
    return blob


def pull(snapshots: SnapshotStore, images: LayerStore, ref: str, tenant: str, vm_root: Path) -> dict:
    """Pull `ref` into a new snapshot of `tenant`; returns its published metadata."""
    remote = registry.RemoteRef.parse(ref)
    client = registry.RegistryClient(remote.host)
    data, _ = client.get_small(f"/v2/{remote.repo}/manifests/{remote.manifest_ref}", oci.MT_MANIFEST)
    if remote.digest and sha256_bytes(data) != remote.digest:
        raise InvalidSpec(f"registry {remote.host}: manifest for {remote} does not match the requested digest: rejected")
    manifest = oci.load_json(data, "snapshot manifest")
    if not isinstance(manifest, dict) or manifest.get("artifactType") != ARTIFACT_TYPE:
        raise InvalidSpec(f"{remote} is not a dsec snapshot (artifactType {ARTIFACT_TYPE} expected)")
    try:
        config_digest = manifest["config"]["digest"]
        sizes = {layer["digest"]: int(layer["size"]) for layer in manifest["layers"] if layer["mediaType"] == CHUNK_TYPE}
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidSpec(f"{remote}: malformed snapshot manifest ({exc}): rejected") from exc
    config, _ = client.get_small(f"/v2/{remote.repo}/blobs/{config_digest}")
    if sha256_bytes(config) != config_digest:
        raise InvalidSpec(f"{remote}: snapshot config {config_digest} failed verification: rejected")
    snapshot, files = _check_config(oci.load_json(config, "snapshot config"), set(sizes))
    _ensure_image(images, remote, snapshot["image"])
    snapshot_id, target = snapshots.new()
    try:
        target.mkdir()
        decompressor = zstandard.ZstdDecompressor()
        partial = target.parent / ".chunk"
        content_ids: dict[str, str] = {}
        zeros: set[str] = set()  # chunks already seen to hold only zeros (a sparse disk repeats one many times)
        for entry in files:
            left = entry["size"]
            with open(target / entry["name"], "wb") as out:
                for digest in entry["chunks"]:
                    want = min(left, CHUNK_BYTES)
                    left -= want
                    if digest in zeros:
                        out.seek(want, 1)
                        continue
                    try:
                        piece = decompressor.decompress(_fetch(client, remote.repo, digest, sizes[digest], partial),
                                                        max_output_size=want)
                    except zstandard.ZstdError as exc:
                        raise InvalidSpec(f"snapshot chunk {digest} does not decompress ({exc}): rejected") from exc
                    if len(piece) != want:
                        raise InvalidSpec(f"snapshot chunk {digest} holds {len(piece)} bytes, not {want}: rejected")
                    if piece.count(0) == want:  # zero runs stay holes (a VM's base disk is mostly zeros)
                        zeros.add(digest)
                        out.seek(want, 1)
                    else:
                        out.write(piece)
                out.truncate(entry["size"])
            content_ids[entry["name"]] = sha256_bytes(json.dumps(entry["chunks"]).encode())[7:23]
        partial.unlink(missing_ok=True)
        portable.localize(target, vm_root, content_ids)
        meta = {**snapshot, "snapshot_id": snapshot_id, "tenant": tenant, "expires_at": 0.0,
                "pulled_from": f"{remote.host}/{remote.repo}@{sha256_bytes(data)}", "pulled_at": time.time()}
        snapshots.publish(snapshot_id, meta)
    except BaseException:
        snapshots.discard(snapshot_id)
        raise
    return meta
