"""A sandbox's root filesystem: the image's read-only layers under a private writable overlay.

Why overlayfs: every sandbox of an image shares the same extracted layer directories, so creating one costs a
single mount (a few ms) whatever the image size, and everything the sandbox writes lands in its own upper dir,
which is also what a filesystem snapshot copies. The mount is done with mount(2) through libc rather than
`mount(8)`, which saves a process start on every create.

The overlay is mounted `volatile` (Linux >= 5.10): overlayfs then skips syncing the upper filesystem on fsync
and on unmount, which otherwise costs ~8 ms per destroy here and far more while the host disk is busy. A
sandbox's writable layer never has to survive a host crash (a restarted server destroys what it finds), so
its durability buys nothing; snapshots read the upper dir through the page cache and are unaffected.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

from dsec.errors import DiskFull, RuntimeFailure
from dsec.loopdev import unmount  # lives beside the loop mounts so images/ (erofs layers) can use it too

MAX_OPTIONS = 4000  # overlay options must fit in one page
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def mount_fs(source: str, target: Path, fstype: str, options: str) -> None:
    """mount(2) without a `mount` process; raises OSError with the errno."""
    if _libc.mount(source.encode(), str(target).encode(), fstype.encode(), 0, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


def mount_overlay(
    lower_dirs: list[Path],
    upper: Path,
    work: Path,
    target: Path,
    sandbox_id: str = "",
    idmapped: Callable[[list[Path], str], None] | None = None,
) -> None:
    """Mount `lower_dirs` (top-most first) + the writable `upper` onto `target` (all created if missing).

    `idmapped(lower_dirs, options)`, when given, mounts instead with the lower layers idmapped (idmap.py) and
    `options` holding only the upper and work dirs.
    """
    if not lower_dirs:
        raise RuntimeFailure(f"image has no layers (sandbox {sandbox_id}): re-import the image", sandbox_id=sandbox_id)
    for lower in lower_dirs:
        if not Path(lower).is_dir():
            raise RuntimeFailure(
                f"image layer {lower} is missing (sandbox {sandbox_id}): the layer store was changed underneath; "
                "re-import the image",
                sandbox_id=sandbox_id,
            )
    for path in (upper, work, target):
        path.mkdir(parents=True, exist_ok=True)
    lowers = f"lowerdir={':'.join(str(p) for p in lower_dirs)},"
    options = f"upperdir={upper},workdir={work}"
    if len(lowers + options) > MAX_OPTIONS:
        raise RuntimeFailure(
            f"image has too many layers for one overlay mount ({len(lower_dirs)} layers, sandbox {sandbox_id}): "
            "squash the image",
            sandbox_id=sandbox_id,
        )
    try:
        if idmapped is None:
            _mount_upper(lambda opts: mount_fs("overlay", target, "overlay", lowers + opts), options)
        else:
            _mount_upper(lambda opts: idmapped(lower_dirs, opts), options)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFull(f"no space for the writable layer of sandbox {sandbox_id}", sandbox_id=sandbox_id) from exc
        raise RuntimeFailure(
            f"overlay mount of sandbox {sandbox_id} on {target} failed: {exc}", sandbox_id=sandbox_id
        ) from exc


_volatile_supported = True


def _mount_upper(mount: Callable[[str], None], options: str) -> None:
    global _volatile_supported
    if _volatile_supported:
        try:
            mount(options + ",volatile")
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _volatile_supported = False  # kernel older than 5.10
    mount(options)


def is_mounted(target: Path) -> bool:
    """Whether `target` is a mount point in this mount namespace."""
    wanted = os.path.realpath(target)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split(" ")
            if len(fields) > 1 and _unescape(fields[1]) == wanted:
                return True
    return False


def mounts_under(*directories: Path) -> list[Path]:
    """Mount points strictly below any of `directories`, deepest first: what must be unmounted before they may be
    removed (removing a tree with a shared layer or a volume mounted in it would delete their files). One read of
    the mount table for all of them: with a few hundred sandboxes it is a few hundred lines."""
    prefixes = tuple(os.path.realpath(directory) + "/" for directory in directories)
    found: list[Path] = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split(" ")
            if len(fields) > 1 and _unescape(fields[1]).startswith(prefixes):
                found.append(Path(_unescape(fields[1])))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def _unescape(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal."""
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


