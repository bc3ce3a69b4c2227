"""Where a container sandbox's short-lived files live: a tmpfs, one directory per `$DSEC_HOME`.

Why: every create made ~15 files and directories (bundle, agent socket dir and socket, runtime log, pid file,
mount points, the runtime's own state) and every destroy freed them. On an ext4 host filesystem each allocation
scans the inodes freed in the last seconds of its block group (`find_inode_bit` -> `recently_deleted`), which
under the churn of many creates was ~60 % of the server's CPU in a 100-create burst (perf, this host). A tmpfs
has no such scan and no disk writes. Nothing here has to outlive a reboot: a reboot ends every container, and
the sandbox's record (in its state directory on the home's disk) still names these paths, so a crash cleanup
after a reboot finds them gone and goes on. They do outlive a server crash (kill -9), which is what
re-adoption and crash cleanup need. What grows with a sandbox's use stays on disk: its ext4 disk image and a
memory pause's CRIU images are in the state directory, so this tmpfs holds a few KB per sandbox.

The tmpfs is mounted once per machine at VOLATILE_ROOT (a directory no older dsec uses, so no live server's
files are hidden by the mount), under a lock. A host where it cannot be mounted keeps these files under the
home, as before.

A home's directory is named by a hash, so it says whose it is in a `home` file; the orphan sweep
(`sweep_deleted_homes`) removes the directories of homes that no longer exist (a test's temporary home, a removed
deployment), which nothing else would ever reach.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from dsec.substrates.container.rootfs import is_mounted, mount_fs, mounts_under

log = logging.getLogger("dsec.substrates.container.volatile")

VOLATILE_ROOT = Path("/run/dsec/volatile")
TMPFS_OPTIONS = "mode=0711,size=256m"  # ~10 KB per sandbox (bundle, runtime state, logs): room for thousands
HOME_FILE = "home"  # in a home's directory: the home's resolved path
# a directory from before HOME_FILE existed is removed only once it is this old and holds nothing at all
UNNAMED_GRACE_S = 600.0

_ready: dict[Path, Path] = {}


def _mount_tmpfs() -> bool:
    """Mount the machine's tmpfs at VOLATILE_ROOT unless it is there; False where it cannot be."""
    if is_mounted(VOLATILE_ROOT):
        return True
    VOLATILE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(VOLATILE_ROOT.parent / ".volatile.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_mounted(VOLATILE_ROOT):
            return True
        try:
            mount_fs("tmpfs", VOLATILE_ROOT, "tmpfs", TMPFS_OPTIONS)
        except OSError as exc:
            log.warning("no tmpfs at %s (%s): sandbox runtime files stay on the home's filesystem", VOLATILE_ROOT, exc)
            return False
    return True


def home_root(home: Path) -> Path:
    """This home's directory on the tmpfs (made on first use), or `home/volatile` where no tmpfs can be mounted.
    Keyed by the home's resolved path: two homes never share runtime state or sandbox directories."""
    home = Path(os.path.realpath(home))
    known = _ready.get(home)
    if known is not None and known.is_dir():
        return known
    if _mount_tmpfs():
        root = VOLATILE_ROOT / hashlib.blake2b(str(home).encode(), digest_size=8).hexdigest()
        root.mkdir(parents=True, exist_ok=True)
        _name_home(root, home)
    else:
        root = home / "volatile"
        root.mkdir(parents=True, exist_ok=True)
    _ready[home] = root
    return root


def _name_home(root: Path, home: Path) -> None:
    """Write whose directory `root` is, once (atomically: a sweep never reads half a path)."""
    marker = root / HOME_FILE
    if marker.exists():
        return
    partial = root / f".{HOME_FILE}.{os.getpid()}"
    partial.write_text(str(home))
    os.replace(partial, marker)


def sweep_deleted_homes(live_ids: Iterable[str], now: float | None = None) -> list[str]:
    """Remove the tmpfs directories of homes that are gone; returns those removed.

    A directory whose `home` file names a path that is no longer a directory goes once nothing is mounted below it
    and none of its sandboxes (`sandboxes/<id>`, a runtime's `oci/<runtime>/<id>`) is in `live_ids` (the ids with a
    cgroup, whose processes may still run; the cgroup sweep, which runs first, removes those of dead owners). A
    directory with no `home` file (made before it existed) cannot say whose it is: it goes only when it holds no
    file, no sandbox, no runtime state and no spare-disk owner, and has not changed for UNNAMED_GRACE_S. A live
    server loses nothing it needs either way: its paths here are made again on use (`home_root`, the runtimes'
    roots, each sandbox's directory)."""
    if not is_mounted(VOLATILE_ROOT):
        return []
    live = set(live_ids)
    now = time.time() if now is None else now
    removed: list[str] = []
    for root in sorted(VOLATILE_ROOT.iterdir()):
        try:
            if root.is_symlink() or not root.is_dir():
                continue
            try:
                home: str | None = (root / HOME_FILE).read_text()
            except FileNotFoundError:
                home = None
            if home is not None:
                if os.path.isdir(home) or mounts_under(root) or _sandbox_ids(root) & live:
                    continue
            elif now - root.stat().st_mtime < UNNAMED_GRACE_S or not _empty_tree(root):
                continue
        except OSError:  # vanished or unreadable: the next sweep looks again
            continue
        shutil.rmtree(root, ignore_errors=True)
        if not root.exists():
            removed.append(str(root))
    return removed


def _sandbox_ids(root: Path) -> set[str]:
    """The sandboxes with files here or state in a runtime's root (a runtime's own dot-directories, such as
    crun's `.cache` of compiled seccomp filters, are no container)."""
    ids = {entry.name for entry in (root / "sandboxes").iterdir()} if (root / "sandboxes").is_dir() else set()
    for runtime in (root / "oci").iterdir() if (root / "oci").is_dir() else ():
        if runtime.is_dir():
            ids.update(entry.name for entry in runtime.iterdir() if not entry.name.startswith("."))
    return ids


def _empty_tree(root: Path) -> bool:
    """Nothing but the skeleton and the runtimes' caches: no other file, no sandbox, no runtime state, no
    spare-disk owner, no mount."""
    if mounts_under(root) or _sandbox_ids(root):
        return False
    spares = root / "spare-disks"
    if spares.is_dir() and any(spares.iterdir()):
        return False
    for _, dirs, files in os.walk(root):
        if files:
            return False
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return True


def sandbox_dir(home: Path, sandbox_id: str) -> Path:
    """The directory of one sandbox's short-lived files (not created here)."""
    return home_root(home) / "sandboxes" / sandbox_id


def runtime_root(home: Path, runtime: str) -> Path:
    """The OCI runtime's `--root` for this home's sandboxes."""
    return home_root(home) / "oci" / runtime
