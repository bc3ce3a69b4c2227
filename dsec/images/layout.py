"""Write OCI image layouts from layer tarballs, and make layer tarballs from directory trees.

Base images and builds both end here: a layer is a tar of a directory (or of the difference between two
directories, with OCI whiteouts for deletions), and an image is a layout other tools (skopeo, umoci, docker)
read as-is. Layers are written uncompressed: the blob digest equals the diff_id, and import skips a gunzip pass.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from dsec.images import oci
from dsec.images.digest import CHUNK
from dsec.images.extract import WHITEOUT_PREFIX

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Directories whose contents never belong in an image (runtime-mounted or host-specific).
SKIP_CONTENTS = ("dev", "proc", "sys", "run")


def file_sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def write_layout(
    dest: Path, layer_tars: list[Path], runtime: dict[str, Any], ref_name: str | None, history: list[str] | None = None
) -> Path:
    """Write an OCI layout at `dest` (replaced atomically) whose layers are `layer_tars` (uncompressed, moved in).

    `runtime` is the config's `config` object (Env, Cmd, WorkingDir, User, Entrypoint).
    """
    dest = Path(dest)
    work = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    blobs = work / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layers: list[oci.Descriptor] = []
    for tar_path in layer_tars:
        digest, size = file_sha256(tar_path)
        shutil.move(str(tar_path), blobs / digest.split(":", 1)[1])
        layers.append(oci.Descriptor(oci.MT_LAYER, digest, size))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": runtime,
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
        "history": [{"created_by": step} for step in (history or [])],
    }
    config_desc = _put(blobs, oci.dumps(config), oci.MT_CONFIG)
    manifest_desc = _put(blobs, oci.build_manifest(config_desc, layers), oci.MT_MANIFEST)
    (work / "index.json").write_bytes(oci.build_index(manifest_desc, ref_name))
    (work / "oci-layout").write_bytes(oci.dumps({"imageLayoutVersion": "1.0.0"}))
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(work, dest)
    return dest


def _put(blobs: Path, data: bytes, media_type: str) -> oci.Descriptor:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest.split(":", 1)[1]).write_bytes(data)
    return oci.Descriptor(media_type, digest, len(data))


def _entries(root: Path, rel: str = "") -> Iterator[str]:
    """Every path under `root`, parents before children, in sorted (reproducible) order."""
    base = root / rel if rel else root
    for entry in sorted(os.scandir(base), key=lambda e: e.name):
        child = f"{rel}/{entry.name}" if rel else entry.name
        yield child
        if entry.is_dir(follow_symlinks=False) and child not in SKIP_CONTENTS:
            yield from _entries(root, child)


def _same(a: os.stat_result, b: os.stat_result, path_a: Path, path_b: Path) -> bool:
    if stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode) or a.st_mode != b.st_mode:
        return False
    if (a.st_uid, a.st_gid) != (b.st_uid, b.st_gid):
        return False
    if stat.S_ISLNK(a.st_mode):
        return os.readlink(path_a) == os.readlink(path_b)
    if stat.S_ISDIR(a.st_mode):
        return True
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


def tree_diff(lower: Path, upper: Path) -> tuple[list[str], list[str]]:
    """Paths of `upper` that are new or changed against `lower`, and paths of `lower` that `upper` deleted.

    Parent directories of changed paths are included so the layer recreates them with the right metadata.
    """
    changed: list[str] = []
    for rel in _entries(upper):
        try:
            old = os.lstat(lower / rel)
        except (FileNotFoundError, NotADirectoryError):
            changed.append(rel)
            continue
        if not _same(old, os.lstat(upper / rel), lower / rel, upper / rel):
            changed.append(rel)
    keep = set(changed)
    for rel in changed:
        parent = rel.rpartition("/")[0]
        while parent and parent not in keep:
            keep.add(parent)
            parent = parent.rpartition("/")[0]
    deleted = []
    for rel in _entries(lower):
        parent = rel.rpartition("/")[0]
        if parent and not os.path.isdir(upper / parent):
            continue  # covered by the deletion or replacement of an ancestor
        if not os.path.lexists(upper / rel):
            deleted.append(rel)
    return sorted(keep, key=_depth_first_key), deleted


def _depth_first_key(rel: str) -> tuple[str, ...]:
    return tuple(rel.split("/"))


def tar_paths(root: Path, paths: Iterable[str], out: Path, whiteouts: Iterable[str] = (), opaque: Iterable[str] = ()) -> Path:
    """Write an uncompressed PAX tar of `paths` under `root`, plus `.wh.` entries for deleted paths.

    Device nodes and sockets are skipped (images never carry them); hard links inside the set stay links.
    """
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in paths:
            full = root / rel
            mode = os.lstat(full).st_mode
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
                continue
            tar.add(full, arcname=rel, recursive=False)
        for rel in opaque:
            tar.addfile(_marker(f"{rel}/.wh..wh..opq" if rel else ".wh..wh..opq"))
        for rel in whiteouts:
            parent, _, name = rel.rpartition("/")
            tar.addfile(_marker(f"{parent}/{WHITEOUT_PREFIX}{name}" if parent else f"{WHITEOUT_PREFIX}{name}"))
    return out


def tar_tree(root: Path, out: Path) -> Path:
    """A layer holding the whole tree under `root` (contents of dev/proc/sys/run left out)."""
    return tar_paths(root, _entries(root), out)


def _marker(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    return info


__all__ = ["DEFAULT_PATH", "file_sha256", "tar_paths", "tar_tree", "tree_diff", "write_layout"]
