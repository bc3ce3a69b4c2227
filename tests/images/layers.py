"""Build layer tars, OCI layouts and docker-save archives in tests (from plain tarfile, not from our code)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Entry:
    name: str
    data: bytes | None = None  # file content; None with kind "file" means empty
    kind: str = "file"  # file | dir | symlink | hardlink | chr | fifo
    link: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    pax: dict[str, str] = field(default_factory=dict)


_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
          "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}


def layer_tar(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = _TYPES[e.kind]
            info.mode = e.mode if e.kind != "dir" or e.mode != 0o644 else 0o755
            info.uid, info.gid = e.uid, e.gid
            info.linkname = e.link
            info.mtime = 1_600_000_000
            info.pax_headers = dict(e.pax)
            data = e.data or b""
            if e.kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _config(diff_ids: list[str], cmd: list[str]) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin", "A=1"], "Cmd": cmd, "WorkingDir": "/work", "User": "1000"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }).encode()


def oci_layout(dest: Path, layers: list[bytes], gzip_layers: bool = False, cmd: list[str] | None = None,
               ref_name: str | None = "latest") -> Path:
    """Write an OCI image layout with the given uncompressed layer tars (optionally gzip-compressed blobs)."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = sha(data)
        (blobs / digest[7:]).write_bytes(data)
        return digest

    descs = []
    for raw in layers:
        blob = gzip.compress(raw, mtime=0) if gzip_layers else raw
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gzip_layers else "")
        descs.append({"mediaType": media, "digest": put(blob), "size": len(blob)})
    config = _config([sha(raw) for raw in layers], cmd or ["sh"])
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(config), "size": len(config)},
        "layers": descs,
    }).encode()
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(manifest), "size": len(manifest)}
    if ref_name:
        entry["annotations"] = {"org.opencontainers.image.ref.name": ref_name}
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return dest


def docker_archive(dest: Path, layers: list[bytes], repo_tags: list[str], cmd: list[str] | None = None) -> Path:
    """Write a legacy `docker save` tarball: <id>/layer.tar per layer, <config hex>.json, manifest.json."""
    config = _config([sha(raw) for raw in layers], cmd or ["sh"])
    names = []
    with tarfile.open(dest, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for raw in layers:
            name = f"{sha(raw)[7:]}/layer.tar"
            add(name, raw)
            names.append(name)
        config_name = f"{sha(config)[7:]}.json"
        add(config_name, config)
        add("manifest.json", json.dumps([{"Config": config_name, "RepoTags": repo_tags, "Layers": names}]).encode())
    return dest
