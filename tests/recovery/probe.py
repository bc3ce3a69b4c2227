"""What sandboxes can leave on a host after their server dies, found by sandbox id.

Which ids: a server records each sandbox in its run directory (`run/<server>/<sandbox>/`, lock file holding
its pid) *before* the driver starts creating it, so the run directory of a killed server names every sandbox
it touched — also creates in flight whose ids the client never learned. `traces` then finds anything left
of those ids (mounts, cgroups, processes, loop devices, ownership registrations, state directories); `host_snapshot` is the id-free view used to
check the audit itself.
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

SANDBOX_ID = re.compile(r"sb-[0-9a-f]{16}")


def _mounts(home: Path) -> set[str]:
    found = set()
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and (str(home) in fields[1] or SANDBOX_ID.search(line)):
            found.add(f"mount {fields[1]}")
    return found


def _cgroups() -> set[str]:
    found = set()
    root = Path("/sys/fs/cgroup")
    for controller in root.iterdir() if root.exists() else ():
        for dirpath, dirnames, _ in os.walk(controller):
            if dirpath.count("/") - str(controller).count("/") > 3:
                dirnames.clear()
                continue
            for name in dirnames:
                if SANDBOX_ID.search(name):
                    found.add(f"cgroup {controller.name}:{SANDBOX_ID.search(name).group(0)}")
    return found


def _processes(home: Path) -> set[str]:
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            root = os.readlink(proc / "root")
        except OSError:
            continue
        match = SANDBOX_ID.search(cmdline) or SANDBOX_ID.search(root)
        if match or root.startswith(str(home)) or cmdline.startswith("qemu-system"):
            found.add(f"process {proc.name} ({(match.group(0) if match else root)}): {cmdline[:80]}")
    return found


def _loops() -> set[str]:
    """Loop devices backed by a sandbox's file (its disk image): attached, they pin the image and a device."""
    found = set()
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            match = SANDBOX_ID.search(backing.read_text())
        except OSError:
            continue
        if match:
            found.add(f"loop {backing.parent.parent.name} ({match.group(0)})")
    return found


def _registrations() -> set[str]:
    """Machine-wide ownership entries (dsec.server.orphans): a reaped sandbox must have dropped its own."""
    registry = Path("/run/dsec/sandboxes")
    return {f"registration {p.name}" for p in registry.iterdir()} if registry.is_dir() else set()


def _dead_run_dirs(home: Path) -> set[str]:
    """Run directories whose server is gone (nobody holds their lock) — a successor should have reaped them."""
    found = set()
    run_root = home / "run"
    for run_dir in run_root.iterdir() if run_root.exists() else ():
        lock = run_dir / "server.lock"
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            found.add(f"run dir without lock {run_dir}")
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            found.add(f"dead run dir {run_dir}")
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
    return found


def host_snapshot(home: Path) -> set[str]:
    """Everything sandbox-shaped on this host right now."""
    return _mounts(home) | _cgroups() | _processes(home) | _loops() | _dead_run_dirs(home)


def sandbox_ids_of_server(home: Path, pid: int) -> tuple[Path | None, list[str]]:
    """The run directory of the server with `pid` and the sandbox ids recorded in it."""
    for lock in (home / "run").glob("*/server.lock"):
        try:
            if lock.read_text().strip() == str(pid):
                run_dir = lock.parent
                return run_dir, sorted(p.name for p in run_dir.iterdir() if p.is_dir() and SANDBOX_ID.fullmatch(p.name))
        except OSError:
            continue
    return None, []


def traces(home: Path, sandbox_ids: list[str]) -> list[str]:
    """Everything still on the host that belongs to one of `sandbox_ids`."""
    wanted = set(sandbox_ids)
    if not wanted:
        return []
    candidates = _mounts(home) | _cgroups() | _processes(home) | _loops() | _registrations()
    found = [item for item in candidates if any(sid in item for sid in wanted)]
    found += [f"state dir {p}" for p in (home / "run").glob("*/sb-*") if p.name in wanted]
    return sorted(found)
