"""Each container sandbox's user namespace: its ids 0..65535 are an unprivileged host range of its own.

Why: without a user namespace a sandbox's root is the host's root, so a kernel or runtime breakout lands as
uid 0. With one, the same breakout lands as a host uid that owns nothing but this sandbox's own files, and
root's capabilities inside count only against what the namespace owns.

Why a range per sandbox rather than one shared range: two sandboxes sharing host ids could signal, ptrace or
read each other's files after a breakout. A range is a slot of 65536 ids from HOST_BASE; a slot is leased by a
symlink `/run/dsec/userns/<slot>` → the sandbox's state dir, machine-wide (every server on the host draws from
the same slots) and taken under one flock (a few µs). A lease whose state dir is gone (a sandbox removed without
its release, or a crash before its record existed) is stale and is taken over; a crashed sandbox's state dir
keeps its slot until its cleanup, because its processes or files may still use those ids.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
from pathlib import Path

from dsec.errors import CapacityExceeded

HOST_BASE = 1 << 28  # 268435456: far above /etc/subuid's usual 100000+ ranges, so no login user's range overlaps
IDS = 65536  # ids 0..65535 inside: every uid and gid a Linux distribution uses, nobody (65534) included
SLOTS = 4096  # host ids HOST_BASE .. HOST_BASE + SLOTS * IDS - 1 (268435456 .. 536870911)
LEASES = Path("/run/dsec/userns")


def slot_base(slot: int) -> int:
    return HOST_BASE + slot * IDS


def _lease_live(lease: Path) -> bool:
    try:
        return Path(os.readlink(lease)).is_dir()
    except FileNotFoundError:
        return False


def allocate(sandbox_id: str, state_dir: Path) -> int:
    """Lease a free slot for the sandbox whose state lives in `state_dir`; returns the host id its 0 maps to."""
    LEASES.mkdir(parents=True, exist_ok=True)
    start = int.from_bytes(hashlib.blake2b(sandbox_id.encode(), digest_size=4).digest(), "big") % SLOTS
    with open(LEASES / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for step in range(SLOTS):
            slot = (start + step) % SLOTS
            lease = LEASES / str(slot)
            if os.path.lexists(lease):
                if _lease_live(lease):
                    continue
                lease.unlink()
            os.symlink(state_dir.resolve(), lease)
            return slot_base(slot)
    raise CapacityExceeded(
        f"no free user-namespace id range for sandbox {sandbox_id}: all {SLOTS} are held by live sandboxes; "
        "destroy some and retry",
        sandbox_id=sandbox_id,
    )


def release(base: int, state_dir: Path) -> None:
    """Give back the slot of `base` if `state_dir` still holds it (a stale lease may have been taken over)."""
    lease = LEASES / str((base - HOST_BASE) // IDS)
    with open(LEASES / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.readlink(lease) == str(state_dir.resolve()):
                lease.unlink()
        except FileNotFoundError:
            pass


def make_reachable(state_dir: Path) -> None:
    """Give every directory from / down to `state_dir` the search bit for others (o+x, never o+r), as Docker does
    for its data root under userns-remap. Why: the runtime mounts the rootfs (`state_dir/rootfs`) after entering
    the user namespace, as the sandbox's root, an unprivileged host uid that must be able to walk the whole path
    (a state dir may sit below a 0700 home or temp dir); a directory it may search but not list reveals nothing
    it cannot name. Checked on every create, not cached: another program may take the bit away again."""
    resolved = Path(os.path.realpath(state_dir))
    for directory in [*reversed(resolved.parents), resolved]:
        mode = os.stat(directory).st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(directory, stat.S_IMODE(mode) | stat.S_IXOTH)


def oci_mappings(base: int) -> dict:
    """config.json's `linux` id maps: the sandbox's 0..IDS-1 are host base..base+IDS-1, for users and groups."""
    mapping = [{"containerID": 0, "hostID": base, "size": IDS}]
    return {"uidMappings": mapping, "gidMappings": mapping}
