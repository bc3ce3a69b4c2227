"""Make cgroup migrations cheap on this host: the cgroup2 mount option `favordynmods` (Linux >= 6.0).

Why: every container start moves its first process into the container's cgroups (an OCI runtime writes its pid to
`cgroup.procs`; `docker exec` does the same for every exec'd process). By default the kernel's threadgroup lock
makes that write wait for an RCU grace period: measured here (2 cores, cgroup v1 with the hybrid cgroup2 mount),
5-11 ms per migration, 15-20 ms of a crun create's 25. `favordynmods` keeps that lock in the mode where writers do
not wait (the kernel documents it for exactly this: frequent task migrations), at a small cost to fork and exit.

It is a machine-wide setting (one lock for all hierarchies, v1 included), so it is host preparation, done by
`make setup` (`infra/setup.d/30-container.sh` runs this module) like the overlayfs and loop-device checks beside
it; the server only warns at start when it is off (`warn_if_slow_migrations`). Docker's containers on the same
host gain from it as much as dsec's, which is what a fair comparison needs (docs/benchmarks.md).

    python -m dsec.substrates.container.cgroup_tuning     # apply; prints what it did
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("dsec.container")

OPTION = "favordynmods"
MOUNTS = Path("/proc/mounts")
MS_REMOUNT = 32


def cgroup2_mounts(mounts_text: str) -> dict[str, list[str]]:
    """Each cgroup2 mount point and its options, from /proc/mounts' text (octal escapes of spaces decoded)."""
    found: dict[str, list[str]] = {}
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup2":
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
            found[point] = fields[3].split(",")
    return found


def state(mounts_text: str | None = None) -> str:
    """"on" when every cgroup2 mount has the option, "off" when one lacks it, "none" when no cgroup2 is mounted
    (the option can then only be set by mounting one, which `apply` does)."""
    mounts = cgroup2_mounts(MOUNTS.read_text() if mounts_text is None else mounts_text)
    if not mounts:
        return "none"
    return "on" if all(OPTION in options for options in mounts.values()) else "off"


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target} ({data}): {os.strerror(err)}")


def apply() -> str:
    """Turn the option on (root only); returns a line saying what was done. Existing mounts are remounted with
    their options plus this one; with no cgroup2 mount, one is mounted on a temporary directory and unmounted
    again (the flag belongs to the hierarchy's root, which outlives the mount). Raises OSError where the kernel
    does not know the option (before 6.0) or the caller may not remount."""
    mounts = cgroup2_mounts(MOUNTS.read_text())
    if not mounts:
        with tempfile.TemporaryDirectory(prefix="dsec-cgroup2-") as scratch:
            _mount("cgroup2", scratch, "cgroup2", 0, OPTION)
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            libc.umount2(scratch.encode(), 0)
        return f"cgroup2: {OPTION} set through a temporary mount (no cgroup2 hierarchy was mounted)"
    changed = []
    for point, options in mounts.items():
        if OPTION in options:
            continue
        # the superblock options cgroup2 knows; per-mount flags (rw, relatime...) are not fs options
        keep = [o for o in options if o in ("nsdelegate", "memory_recursiveprot", "memory_localevents", "memory_hugetlb_accounting", "pids_localevents")]
        _mount("none", point, "cgroup2", MS_REMOUNT, ",".join([*keep, OPTION]))
        changed.append(point)
    if not changed:
        return f"cgroup2: {OPTION} already on"
    return f"cgroup2: {OPTION} on for {', '.join(changed)}"


_warned = False


def warn_if_slow_migrations() -> None:
    """A check when a container driver is built: log once per process why creates may be slow here and how to
    fix it."""
    global _warned
    if _warned:
        return
    _warned = True
    try:
        current = state()
    except OSError:
        return
    if current != "on":
        log.warning("cgroup2 is mounted without %s (or not at all): each container create waits ~10 ms for an RCU "
                    "grace period while its process joins its cgroups; `make setup` or `python -m %s` turns it on",
                    OPTION, __name__)


def main() -> int:
    try:
        done = apply()
        if not done.endswith("already on"):  # setup is quiet when all is there
            print(f"setup: {done}")
    except OSError as exc:
        print(f"setup: note: could not set cgroup2 {OPTION} ({exc}); container creates will be slower here", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
