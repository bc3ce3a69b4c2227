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
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from pathlib import Path

from dsec.substrates.container.rootfs import is_mounted, mount_fs

log = logging.getLogger("dsec.substrates.container.volatile")

VOLATILE_ROOT = Path("/run/dsec/volatile")
TMPFS_OPTIONS = "mode=0711,size=256m"  # ~10 KB per sandbox (bundle, runtime state, logs): room for thousands

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
    else:
        root = home / "volatile"
    root.mkdir(parents=True, exist_ok=True)
    _ready[home] = root
    return root


def sandbox_dir(home: Path, sandbox_id: str) -> Path:
    """The directory of one sandbox's short-lived files (not created here)."""
    return home_root(home) / "sandboxes" / sandbox_id


def runtime_root(home: Path, runtime: str) -> Path:
    """The OCI runtime's `--root` for this home's sandboxes."""
    return home_root(home) / "oci" / runtime
