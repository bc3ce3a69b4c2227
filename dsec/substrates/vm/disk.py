"""Root disks for VMs, built from the same image-store layers the containers stack with overlayfs.

One raw ext4 image per image digest and disk budget (built once from the merged read-only view of the layers, cached under
`$DSEC_HOME/vm/disks/`, sized by the sandbox's disk budget, published by an atomic rename so a kill -9 mid-build never leaves a half disk), and a
thin qcow2 overlay per sandbox whose backing file is that image: create cost does not grow with image size,
and every write a sandbox makes stays in its own overlay.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dsec.errors import RuntimeFailure
from dsec.substrates.base import ImageRootfs


def _check(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeFailure(f"{what}: {' '.join(argv[:3])}… failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")


def _tree_bytes(roots: list[Path]) -> int:
    total = 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            total += 4096 * (1 + len(dirnames))
            for name in filenames:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size + 512
                except OSError:
                    pass
    return total


@contextlib.contextmanager
def _merged_view(lower_dirs: list[Path]) -> Iterator[Path]:
    """The image's root as one directory: the layer itself, or a read-only overlay of all layers."""
    if len(lower_dirs) == 1:
        yield lower_dirs[0]
        return
    mountpoint = Path(tempfile.mkdtemp(prefix="dsec-vmdisk-"))
    try:
        lower = ":".join(str(p) for p in lower_dirs)
        _check(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", str(mountpoint)], "merging layers")
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
    finally:
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


def image_disk(image: ImageRootfs, disks_dir: Path, free_mb: int) -> Path:
    """The cached raw ext4 root disk of `image` with about `free_mb` of free space (built on first use; concurrent
    callers build it once).

    The free space is the sandbox's disk budget (spec.resources.disk_mb): the guest's own filesystem says ENOSPC
    when it is spent, exactly where a container's writable layer does, and the sparse qcow2 overlay on the host
    can never outgrow the filesystem inside it. One disk (and one template) per (image, budget) pair.
    """
    disks_dir.mkdir(parents=True, exist_ok=True)
    digest = image.digest.split(":", 1)[-1]
    path = disks_dir / f"{digest}.{free_mb}m.ext4"
    if path.exists():
        return path
    with open(disks_dir / f".{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        size_mb = _tree_bytes(image.lower_dirs) * 9 // 8 // (1 << 20) + free_mb + 2  # + ext4 metadata
        tmp = disks_dir / f".{digest}.{os.getpid()}.tmp"
        try:
            with _merged_view(image.lower_dirs) as root:
                _check(
                    [
                        "mkfs.ext4", "-q", "-F", "-L", "dsec-root", "-O", "^has_journal", "-m", "0",
                        "-E", "root_owner=0:0,lazy_itable_init=1", "-d", str(root), str(tmp), f"{size_mb}M",
                    ],
                    f"building the VM root disk of {image.reference}",
                )
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return path


def create_overlay(base: Path, overlay: Path) -> None:
    """A sandbox's private copy-on-write disk on top of the shared raw image."""
    _check(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", str(base), "-F", "raw", str(overlay)],
        f"creating disk overlay {overlay}",
    )


def copy_overlay(src: Path, dest: Path) -> None:
    """Clone an overlay (it names its backing image by absolute path, so the copy works anywhere)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
