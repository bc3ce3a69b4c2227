"""The Docker driver's writable-layer quota (spec.resources.disk_mb): the crun path's per-sandbox ext4 disk, under
the container's overlay2 layer directory.

Why not `--storage-opt size=`: Docker's overlay2 enforces it only with xfs project quotas, and this host's kernel
is built without them (`CONFIG_XFS_QUOTA` unset: `mount -o prjquota` of an xfs image fails with "quota support
not available in this kernel"); ext4 project quotas are not an option either, since overlayfs writes with the
mounter's CAP_SYS_RESOURCE, which ext4 quotas exempt. A filesystem of the sandbox's own size stops every writer,
needs nothing from the host's kernel config, and behaves exactly like a crun/runc sandbox's disk: a fill ends
with ENOSPC inside the sandbox (and `DiskFull` from the file API), never on the host.

How: between `create` and `start` the container's read-write layer directory (`overlay2/<id>`: diff/, work/,
link, lower) holds only bookkeeping. A fresh disk is mounted in the sandbox's state directory, that content is
copied onto it (owners too: a remapping engine's layer belongs to the container's mapped root), and the disk
is bind-mounted over the layer directory; Docker then mounts the overlay with its
upper and work dirs on the disk. When Docker removes the container it unmounts the disk itself (its removal
unmounts a busy mount point it meets), and the loop device detaches itself; `remove` deletes the image file.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

from dsec.errors import RuntimeFailure
from dsec.substrates.container import disk
from dsec.substrates.container.rootfs import unmount

MS_BIND = 4096
DISK_IMAGE = "disk.img"
STAGING = "disk"
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _bind(source: Path, target: Path) -> None:
    if _libc.mount(str(source).encode(), str(target).encode(), None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


def _copy_owners(source: Path, dest: Path) -> None:
    """Give every entry of `dest` its `source` twin's owner (copytree keeps modes, not owners). Why: on a remapping
    engine the layer's diff/ and work/ belong to the container's mapped root, and the upper dir's owner is who `/`
    belongs to inside."""
    for directory, names, files in os.walk(source):
        for name in [".", *names, *files]:
            src = Path(directory, name)
            st = os.lstat(src)
            os.lchown(dest / src.relative_to(source), st.st_uid, st.st_gid)


def attach(layer_dir: Path, state_dir: Path, size_mb: int, sandbox_id: str, template_dir: Path) -> None:
    """Put the container's read-write layer `layer_dir` on a `size_mb` disk whose image lives in `state_dir`."""
    staging = state_dir / STAGING
    disk.create_disk(state_dir / DISK_IMAGE, staging, size_mb, sandbox_id, template_dir)
    try:
        shutil.copytree(layer_dir, staging, symlinks=True, dirs_exist_ok=True)
        shutil.copystat(layer_dir, staging)
        _copy_owners(layer_dir, staging)
        _bind(staging, layer_dir)
    except OSError as exc:
        raise RuntimeFailure(
            f"putting the writable layer of sandbox {sandbox_id} on its {size_mb} MB disk failed: {exc}",
            sandbox_id=sandbox_id,
        ) from exc
    finally:
        unmount(staging)  # the bind over the layer directory now holds the disk


def remove(state_dir: Path) -> None:
    """Drop what `attach` left in `state_dir` once Docker removed the container (it unmounts the layer itself)."""
    disk.remove_disk(state_dir / DISK_IMAGE, state_dir / STAGING)
