"""Mount a filesystem image through an auto-clearing loop device, in-process.

Used for each sandbox's writable-layer disk (ext4, read-write) and for erofs image layers (read-only). Loop
attach (LOOP_CONFIGURE) and mount(2) are done here rather than by `losetup`/`mount` processes, which would be
most of a create's cost. The device is auto-clearing: it detaches itself when the last mount of it goes, so an
unmount (or a lazily detached mount freed later) never leaks a loop device.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import time
from pathlib import Path

from dsec.errors import RuntimeFailure

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_NAME_SIZE = 64
MS_RDONLY = 1
MNT_DETACH = 2
ATTACH_ATTEMPTS = 64
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _loop_config(backing_fd: int, read_only: bool) -> bytes:
    """struct loop_config { u32 fd; u32 block_size; struct loop_info64 info; u64 reserved[8]; }"""
    flags = LO_FLAGS_AUTOCLEAR | (LO_FLAGS_READ_ONLY if read_only else 0)
    info = struct.pack(
        "=QQQQQIIII" + f"{LO_NAME_SIZE}s{LO_NAME_SIZE}s" + "32s" + "2Q",
        0, 0, 0, 0, 0,  # device, inode, rdevice, offset, sizelimit
        0, 0, 0, flags,  # number, encrypt_type, encrypt_key_size, flags
        b"", b"", b"", 0, 0,
    )  # fmt: skip
    return struct.pack("=II", backing_fd, 0) + info + bytes(64)


def mount_image(image: Path, target: Path, fstype: str, options: str = "", read_only: bool = False,
                what: str = "") -> None:
    """Attach `image` to a free loop device and mount its `fstype` filesystem on `target`.

    mount(2) failures raise OSError with the errno; no free loop device after retries raises RuntimeFailure.
    """
    backing = os.open(image, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(ATTACH_ATTEMPTS):
                device = f"/dev/loop{fcntl.ioctl(control, LOOP_CTL_GET_FREE)}"
                try:
                    loop = os.open(device, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
                except FileNotFoundError:
                    time.sleep(0.005)  # devtmpfs has not created the node yet
                    continue
                try:
                    fcntl.ioctl(loop, LOOP_CONFIGURE, _loop_config(backing, read_only))
                except OSError as exc:
                    os.close(loop)
                    if exc.errno == errno.EBUSY:  # another process took the same free device first
                        continue
                    raise
                try:
                    flags = MS_RDONLY if read_only else 0
                    if _libc.mount(device.encode(), str(target).encode(), fstype.encode(), flags, options.encode()) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, os.strerror(err), str(target))
                finally:
                    os.close(loop)  # the mount holds the device now; autoclear detaches it at unmount
                return
        finally:
            os.close(control)
    finally:
        os.close(backing)
    raise RuntimeFailure(f"no free loop device to mount {what or image}: too many mounts on this host?")


def _umount(target: Path, flags: int) -> int:
    """0 on success, else the errno."""
    if _libc.umount2(str(target).encode(), flags) != 0:
        return ctypes.get_errno()
    return 0


def unmount(target: Path) -> None:
    """Unmount `target` (every mount stacked on it); a busy mount is detached lazily. Not mounted is fine."""
    for _ in range(16):
        err = _umount(target, 0)
        if err == errno.EBUSY:
            err = _umount(target, MNT_DETACH)
        if err in (errno.EINVAL, errno.ENOENT):
            return
        if err != 0:
            raise RuntimeFailure(f"unmounting {target} failed: {os.strerror(err)}")
