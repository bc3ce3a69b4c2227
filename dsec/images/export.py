"""Export images from the store as OCI image layouts or `docker save` tarballs, blobs byte for byte.

Because manifests, configs and layer blobs are written exactly as stored, an export re-imported anywhere
(our store, skopeo, umoci, `docker load`) has the same digests, and a round trip is the identity.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

from dsec.errors import ImageNotFound
from dsec.images import oci
from dsec.images.digest import hex_of
from dsec.images.store import ImageRecord, LayerStore


def _blob(store: LayerStore, record: ImageRecord, digest: str) -> Path:
    path = store.blob_path(digest)
    if not path.exists():
        raise ImageNotFound(
            f"blob {digest} of image {record.digest} is not on this node (lazily pulled layers keep only the "
            "extracted dir): `dsec images pull` it fully before exporting"
        )
    return path


def export_oci_layout(store: LayerStore, ref: str, dest: Path, ref_name: str | None = None) -> Path:
    """Write `ref` as an OCI image layout at `dest` (created, or added to if it already is a layout)."""
    record = store.inspect(ref)
    dest = Path(dest)
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for digest in [record.digest, record.config_digest, *[layer.blob_digest for layer in record.layers]]:
        target = blobs / hex_of(digest)
        if not target.exists():
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(_blob(store, record, digest), tmp)  # a copy: the store's blobs stay immutable
            os.replace(tmp, target)
    manifest_bytes = store.read_blob(record.digest)
    media_type = oci.load_json(manifest_bytes, "image manifest").get("mediaType", oci.MT_MANIFEST)
    name = ref_name or (record.tags[0].rsplit(":", 1)[-1] if record.tags else None)
    entry = oci.Descriptor(media_type, record.digest, len(manifest_bytes)).to_json()
    if name:
        entry["annotations"] = {oci.REF_NAME_ANNOTATION: name}
    index_path = dest / "index.json"
    manifests = []
    if index_path.exists():
        manifests = [m for m in json.loads(index_path.read_text()).get("manifests", [])
                     if not name or (m.get("annotations") or {}).get(oci.REF_NAME_ANNOTATION) != name]
    manifests.append(entry)
    index_path.write_bytes(oci.dumps({"schemaVersion": 2, "mediaType": oci.MT_INDEX, "manifests": manifests}))
    (dest / "oci-layout").write_bytes(oci.dumps({"imageLayoutVersion": "1.0.0"}))
    return dest


def _docker_tag(tag: str) -> str:
    """docker load wants `name:tag`; our tags may omit `:tag` (meaning latest)."""
    return tag if ":" in tag.rsplit("/", 1)[-1] else f"{tag}:latest"


def export_docker_archive(store: LayerStore, ref: str, out: Path, repo_tags: list[str] | None = None) -> Path:
    """Write `ref` as a `docker save`-format tarball that `docker load` accepts (legacy layout)."""
    record = store.inspect(ref)
    tags = [_docker_tag(t) for t in (repo_tags if repo_tags is not None else record.tags)]
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            config_name = f"{hex_of(record.config_digest)}.json"
            tar.add(_blob(store, record, record.config_digest), arcname=config_name)
            layer_names = []
            for layer in record.layers:
                name = f"{hex_of(layer.blob_digest)}/layer.tar"
                info = tar.gettarinfo(_blob(store, record, layer.blob_digest), arcname=name)
                info.mode, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, "", ""
                with open(store.blob_path(layer.blob_digest), "rb") as fh:
                    tar.addfile(info, fh)
                layer_names.append(name)
            manifest = json.dumps([{"Config": config_name, "RepoTags": tags, "Layers": layer_names}]).encode()
            info = tarfile.TarInfo("manifest.json")
            info.size = len(manifest)
            tar.addfile(info, io.BytesIO(manifest))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
