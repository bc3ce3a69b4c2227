"""Import images from the two on-disk interchange formats: OCI image layouts and `docker save` tarballs.

Both stream every layer through `LayerStore.ensure_layer`, which verifies digests and extracts each layer at
most once machine-wide, so importing an image whose layers are already present costs only the hashing of
documents, not a re-extraction.
"""

from __future__ import annotations

import contextlib
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from dsec.errors import ImageNotFound, InvalidSpec
from dsec.images import oci
from dsec.images.digest import check_digest, hex_of, sha256_bytes
from dsec.images.extract import FileRegion
from dsec.images.types import ImageRecord

if TYPE_CHECKING:  # the store's import methods call these: a runtime import would be a cycle
    from dsec.images.store import LayerStore

_PLATFORM = {"os": "linux", "architecture": "amd64"}


def _read_small(path: Path, what: str) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InvalidSpec(f"{what} {path} is missing") from None
    if size > oci.MAX_DOC_BYTES:
        raise InvalidSpec(f"{what} {path} is {size} bytes (limit {oci.MAX_DOC_BYTES}): rejected")
    return path.read_bytes()


def _layout_blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / hex_of(digest)


def _pick_manifest(layout: Path, index: dict[str, Any], ref_name: str | None, depth: int = 0) -> bytes:
    """Follow an OCI index (possibly nested) down to one image manifest for linux/amd64."""
    if depth > 4:
        raise InvalidSpec(f"OCI layout {layout}: image indexes nested too deeply")
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise InvalidSpec(f"OCI layout {layout}: index lists no manifests")
    chosen = entries
    if ref_name is not None:
        chosen = [m for m in entries if (m.get("annotations") or {}).get(oci.REF_NAME_ANNOTATION) == ref_name]
        if not chosen:
            names = sorted(str((m.get("annotations") or {}).get(oci.REF_NAME_ANNOTATION)) for m in entries)
            raise ImageNotFound(f"OCI layout {layout} has no manifest named {ref_name!r}; it has {names}")
    if len(chosen) > 1:
        chosen = [m for m in chosen if not m.get("platform") or all(m["platform"].get(k) == v for k, v in _PLATFORM.items())]
    if len(chosen) != 1:
        raise InvalidSpec(f"OCI layout {layout}: {len(chosen)} candidate manifests; name one with ref_name")
    desc = oci.Descriptor.from_json(chosen[0], f"OCI layout {layout} index entry")
    data = _read_small(_layout_blob(layout, desc.digest), "manifest blob")
    if sha256_bytes(data) != desc.digest:
        raise InvalidSpec(f"OCI layout {layout}: manifest blob does not match its digest {desc.digest}")
    if desc.media_type in oci.INDEX_TYPES:
        return _pick_manifest(layout, oci.load_json(data, "nested image index"), None, depth + 1)
    return data


def import_oci_layout(store: LayerStore, layout: Path, tag: str | None, ref_name: str | None = None) -> ImageRecord:
    """Import the image of an OCI image layout directory (as written by skopeo, umoci, buildah or us)."""
    layout = Path(layout)
    if not (layout / "oci-layout").is_file():
        raise InvalidSpec(f"{layout} is not an OCI image layout (no oci-layout file)")
    index = oci.load_json(_read_small(layout / "index.json", "index.json"), "index.json")
    manifest_bytes = _pick_manifest(layout, index, ref_name)
    manifest = oci.parse_manifest(manifest_bytes)
    config_bytes = _read_small(_layout_blob(layout, manifest.config.digest), "config blob")
    ids = oci.diff_ids(oci.load_json(config_bytes, "image config"))
    if len(ids) != len(manifest.layers):
        raise InvalidSpec(f"OCI layout {layout}: config has {len(ids)} diff_ids for {len(manifest.layers)} layers")
    for desc, diff_id in zip(manifest.layers, ids):
        path = _layout_blob(layout, desc.digest)
        if not store.has_layer(diff_id) and not path.is_file():
            raise InvalidSpec(f"OCI layout {layout}: layer blob {desc.digest} is missing")
        source = FileRegion(path, 0, path.stat().st_size) if path.is_file() else None
        store.ensure_layer(diff_id, desc.digest, _file_opener(path), limit=desc.size, source=source)
    return store.add_image(manifest_bytes, config_bytes, [tag] if tag else [], source=f"oci:{layout}")


def _file_opener(path: Path):
    @contextlib.contextmanager
    def opener() -> Iterator[BinaryIO]:
        with open(path, "rb") as fh:
            yield fh

    return opener


def _member_opener(tar: tarfile.TarFile, member: tarfile.TarInfo):
    @contextlib.contextmanager
    def opener() -> Iterator[BinaryIO]:
        fh = tar.extractfile(member)
        if fh is None:
            raise InvalidSpec(f"docker archive entry {member.name!r} is not a regular file")
        yield fh  # type: ignore[misc]

    return opener


def _docker_manifest(archive: Path, members: dict[str, tarfile.TarInfo], tar: tarfile.TarFile) -> list[dict[str, Any]]:
    entry = members.get("manifest.json")
    if entry is None:
        if "index.json" in members:
            raise InvalidSpec(f"{archive} is an OCI archive without docker's manifest.json: untar it and import as 'oci'")
        raise InvalidSpec(f"{archive} is not a docker-save archive (no manifest.json)")
    if entry.size > oci.MAX_DOC_BYTES:
        raise InvalidSpec(f"{archive}: manifest.json is too large")
    doc = oci.load_json(tar.extractfile(entry).read(), "docker manifest.json")  # type: ignore[union-attr]
    if not isinstance(doc, list) or not doc or not all(isinstance(d, dict) for d in doc):
        raise InvalidSpec(f"{archive}: manifest.json is not a non-empty list of images")
    return doc


def import_docker_archive(store: LayerStore, archive: Path, tag: str | None) -> ImageRecord:
    """Import the first image of a `docker save` tarball (legacy or OCI-style layout inside).

    The stored manifest is an OCI manifest pointing at the layer blobs as docker wrote them (usually
    uncompressed, so blob digest == diff_id); the config is kept byte for byte, so the image id is unchanged.
    """
    archive = Path(archive)
    try:
        tar = tarfile.open(archive, "r:")
    except (OSError, tarfile.TarError) as exc:
        raise InvalidSpec(f"{archive} is not a readable tar archive: {exc}") from exc
    with tar:
        try:
            listed = tar.getmembers()
        except (tarfile.TarError, EOFError) as exc:  # a truncated or corrupt archive (found by bench/fuzz.py)
            raise InvalidSpec(f"{archive} is a corrupt tar archive: {exc}") from exc
        members = {m.name[2:] if m.name.startswith("./") else m.name: m for m in listed}
        entry = _docker_manifest(archive, members, tar)[0]
        config_name = entry.get("Config")
        layer_names = entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise InvalidSpec(f"{archive}: manifest.json entry lacks Config or Layers")
        config_member = members.get(config_name)
        if config_member is None or not config_member.isfile() or config_member.size > oci.MAX_DOC_BYTES:
            raise InvalidSpec(f"{archive}: config {config_name!r} is missing or too large")
        config_bytes = tar.extractfile(config_member).read()  # type: ignore[union-attr]
        ids = oci.diff_ids(oci.load_json(config_bytes, "image config"))
        if len(ids) != len(layer_names):
            raise InvalidSpec(f"{archive}: config has {len(ids)} diff_ids for {len(layer_names)} layers")
        layers = []
        for name, diff_id in zip(layer_names, ids):
            member = members.get(name) if isinstance(name, str) else None
            while member is not None and member.issym():  # docker dedups identical layers with symlinks
                member = members.get(str(Path(name).parent / member.linkname).lstrip("/"))
            if member is None or not member.isfile():
                raise InvalidSpec(f"{archive}: layer {name!r} is missing")
            declared = f"sha256:{name.rsplit('/', 1)[-1]}" if name.startswith("blobs/sha256/") else None
            source = FileRegion(archive, member.offset_data, member.size)
            info = store.ensure_layer(diff_id, declared and check_digest(declared), _member_opener(tar, member),
                                      limit=member.size, source=source)
            layers.append(oci.Descriptor(info.media_type, info.blob_digest, info.size))
    config_desc = oci.Descriptor(oci.MT_CONFIG, sha256_bytes(config_bytes), len(config_bytes))
    manifest_bytes = oci.build_manifest(config_desc, layers)
    repo_tags = [t for t in entry.get("RepoTags") or [] if isinstance(t, str)]
    tags = [tag] if tag else repo_tags
    return store.add_image(manifest_bytes, config_bytes, tags, source=f"docker-archive:{archive}")
