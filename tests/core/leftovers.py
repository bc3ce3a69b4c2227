"""Find anything a sandbox left on the host: mounts, cgroups, processes, state directories, containers."""

from __future__ import annotations

import os
from pathlib import Path

from dsec.substrates.container.volatile import VOLATILE_ROOT


def leftovers(sandbox_id: str) -> list[str]:
    found: list[str] = []
    for line in Path("/proc/mounts").read_text().splitlines():
        if sandbox_id in line:
            found.append(f"mount: {line}")
    # os.walk skips directories that vanish mid-walk (other tests create and remove cgroups meanwhile)
    for root, dirs, _ in os.walk("/sys/fs/cgroup", onerror=lambda _error: None):
        found.extend(f"cgroup: {root}/{name}" for name in dirs if sandbox_id in name)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            root = os.readlink(proc / "root")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if sandbox_id in root or sandbox_id in cmdline:
            found.append(f"process {proc.name}: root={root} cmd={cmdline[:120]}")
    home = Path(os.environ.get("DSEC_HOME", "/var/lib/dsec"))
    for path in (home / "run").glob(f"*/{sandbox_id}"):
        found.append(f"state dir: {path}")
    for path in VOLATILE_ROOT.glob(f"*/sandboxes/{sandbox_id}"):
        found.append(f"runtime files dir: {path}")
    return found
