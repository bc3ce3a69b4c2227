"""The `erofs` layer format: each extracted layer packed into one read-only erofs image, loop-mounted once.

Why offer it next to plain directories: a layer becomes one file (one inode to copy, hash or delete instead of
tens of thousands), metadata is compact and read-only by construction, and a mounted layer is shared by every
sandbox on the machine. The price is a mkfs pass at import and a loop mount on first use; docs/images.md has the
measured comparison.

Mount life cycle: `mount_layer` mounts `layers/<hex>.erofs` read-only on `mounts/<hex>` through an auto-clearing,
read-only loop device; `unmount_layer` detaches it. A detached mount that an overlay still uses as a lower
layer stays alive inside that overlay and is freed, loop device included, when the overlay is unmounted, so
unmounting never breaks a running sandbox and never leaks a loop device.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

from dsec.errors import DiskFull, RuntimeFailure
from dsec.loopdev import mount_image, unmount

MKFS = "mkfs.erofs"
MKFS_TIMEOUT_S = 1800  # multi-GB layers on a loaded 2-core machine


def available() -> bool:
    """Whether this machine can build (erofs-utils) and mount (kernel erofs) layer images."""
    if shutil.which(MKFS) is None:
        return False
    with contextlib.suppress(OSError), open("/proc/filesystems") as fh:
        return any(line.split()[-1:] == ["erofs"] for line in fh)
    return False


def build_image(src_dir: Path, dest: Path, what: str) -> None:
    """Pack the extracted layer `src_dir` into the erofs image `dest` (owners, modes, xattrs, whiteouts kept)."""
    if shutil.which(MKFS) is None:
        raise RuntimeFailure(f"{MKFS} is not installed (needed for layer_format=erofs): run infra/setup.sh or use layer_format=dir")
    try:
        proc = subprocess.run(
            [MKFS, "--quiet", str(dest), str(src_dir)],
            capture_output=True,
            text=True,
            timeout=MKFS_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"{MKFS} of {what} took over {MKFS_TIMEOUT_S}s: the machine is overloaded; retry") from None
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()[-500:]
        if "No space" in message:
            raise DiskFull(f"no space left while packing {what} into erofs: free space or run `dsec images prune`")
        raise RuntimeFailure(f"{MKFS} failed for {what}: {message}")


def mount_layer(image: Path, target: Path, what: str) -> None:
    """Mount `image` read-only on `target` (created if missing). The caller holds the layer's lock.

    Loop attach (LOOP_CONFIGURE) and mount(2) are done in-process: a `mount` process per layer would be most
    of a cold create's cost.
    """
    target.mkdir(parents=True, exist_ok=True)
    try:
        mount_image(image, target, "erofs", read_only=True, what=what)
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot mount {what} ({image}): {exc.strerror}; check that the kernel has erofs, or use layer_format=dir"
        ) from exc


def unmount_layer(target: Path) -> None:
    """Detach the layer mounted on `target` and remove the mount point (not mounted: just the directory)."""
    unmount(target)
    try:
        target.rmdir()
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EBUSY):
            raise


def is_mounted(target: Path) -> bool:
    return os.path.ismount(target)
