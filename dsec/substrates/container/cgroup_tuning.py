"""Make cgroup migrations cheap on this host: the cgroup2 mount option `favordynmods` (Linux >= 6.0).

Why: every container start moves its first process into the container's cgroups (an OCI runtime writes its pid to
`cgroup.procs`; `docker exec` does the same for every exec'd process). By default the kernel's threadgroup lock
makes that write wait for an RCU grace period: measured here (2 cores, cgroup v1 with the hybrid cgroup2 mount),
5-11 ms per migration, 15-20 ms of a crun create's 25. `favordynmods` moves those writes to a lock where they do
not wait (the kernel documents it for exactly this: frequent task migrations), at a small cost to fork and exit.

It is a machine-wide setting, so it is host preparation, done once by `make setup` (`infra/setup.d/30-container.sh`
runs this module) beside the overlayfs and loop-device checks. Docker's containers on the same host gain from it
as much as dsec's, which is what a fair comparison needs (docs/benchmarks.md).

What clears it, and why dsec does not set it again by itself: CRIU (memory pause, fork of a running container)
mounts cgroup2 for its own use without the option, which clears the flag. Kernels with the per-threadgroup lock
(6.18 here) keep using it anyway (they log "per threadgroup rwsem mechanism can't be disabled"); on older ones
migrations wait again until the next `make setup`. Setting the flag again from the server after a CRIU
call was tried: turning it on right after a restore returned left the restored agent unreachable (in each of four
tries, crun and runc, on 6.18), so the server never flips it; only setup does, when no restore is in flight.

    python -m dsec.substrates.container.cgroup_tuning     # apply; prints what it changed
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import tempfile
from pathlib import Path

from dsec.loopdev import unmount

OPTION = "favordynmods"
MOUNTS = Path("/proc/mounts")
MS_REMOUNT = 32
_libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc, as dsec's other mount callers load it
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
# the cgroup2 superblock options a remount must pass again to keep them (rw, relatime... are per-mount flags)
KEPT_OPTIONS = ("nsdelegate", "memory_recursiveprot", "memory_localevents", "memory_hugetlb_accounting",
                "pids_localevents")


def cgroup2_mounts(mounts_text: str) -> dict[str, list[str]]:
    """Each cgroup2 mount point and its options, from /proc/mounts' text (its octal escapes decoded)."""
    found: dict[str, list[str]] = {}
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup2":
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
            found[point] = fields[3].split(",")
    return found


def state(mounts_text: str | None = None) -> str:
    """"on" when every cgroup2 mount shows the option, "off" when one lacks it, "none" when no cgroup2 is mounted.
    What the mounts show, not what the kernel does: after CRIU cleared the flag a kernel with the per-threadgroup lock still migrates
    without waiting (the module docstring), so benchmarks measure a migration instead of trusting this."""
    mounts = cgroup2_mounts(MOUNTS.read_text() if mounts_text is None else mounts_text)
    if not mounts:
        return "none"
    return "on" if all(OPTION in options for options in mounts.values()) else "off"


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target} ({data}): {os.strerror(err)}")


def _umount(target: str) -> None:
    unmount(Path(target))


def apply() -> str:
    """Turn the option on (root only); returns a line saying what was done. Existing cgroup2 mounts are remounted
    with their superblock options plus this one; with none mounted, one is mounted on a temporary directory and
    unmounted again (the flag belongs to the hierarchy's root, which outlives the mount). Raises OSError where
    the kernel does not know the option (before 6.0) or the caller may not remount."""
    mounts = cgroup2_mounts(MOUNTS.read_text())
    if not mounts:
        with tempfile.TemporaryDirectory(prefix="dsec-cgroup2-") as scratch:
            _mount("cgroup2", scratch, "cgroup2", 0, OPTION)
            _umount(scratch)
        return f"cgroup2: {OPTION} set through a temporary mount (no cgroup2 hierarchy was mounted)"
    changed = []
    for point, options in mounts.items():
        if OPTION not in options:
            _mount("none", point, "cgroup2", MS_REMOUNT, ",".join([*(o for o in options if o in KEPT_OPTIONS), OPTION]))
            changed.append(point)
    if not changed:
        return f"cgroup2: {OPTION} already on"
    return f"cgroup2: {OPTION} on for {', '.join(changed)}"


def main() -> int:
    try:
        done = apply()
    except OSError as exc:
        print(f"setup: note: could not set cgroup2 {OPTION} ({exc}); each container create waits ~10 ms longer here",
              file=sys.stderr)
        return 0
    if not done.endswith("already on"):  # setup is quiet when all is there
        print(f"setup: {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
