"""Host-side evidence for the hostile suite: what an escape would change on the host, read before and after.

A command that fails inside a sandbox proves little on its own (it may fail for an unrelated reason, or succeed
in a way the sandbox cannot see). These helpers read the host directly — kernel knobs, cgroup v1 release agents,
the mount table, the kernel log, processes, keys, listeners, block devices — so each attempt's verdict rests on
the host being unchanged. Other suites run on the same machine, so checks are targeted: global knobs nobody else
changes are compared exactly; everything else is searched for a per-attempt token the attacker had to use.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Kernel knobs that classic escapes write (core_pattern runs a helper as host root on a crash; the others change
# host-wide behaviour). Missing ones (a kernel without the option) are skipped.
KNOBS = [
    "/proc/sys/kernel/core_pattern",
    "/proc/sys/kernel/modprobe",
    "/proc/sys/kernel/hostname",
    "/proc/sys/kernel/panic",
    "/proc/sys/vm/swappiness",
    "/sys/kernel/uevent_helper",
    "/sys/kernel/mm/transparent_hugepage/enabled",
    "/sys/kernel/mm/ksm/run",
    "/sys/kernel/mm/ksm/pages_to_scan",
]
CGROUP_V1 = Path("/sys/fs/cgroup")
ZERO_64K_SHA256 = hashlib.sha256(bytes(65536)).hexdigest()


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return None


@dataclass(frozen=True)
class HostState:
    """Host values an escape would change: knobs and every v1 hierarchy's release agent and notify flag."""

    knobs: dict[str, str]
    cgroup_roots: dict[str, str]  # "<hierarchy>/release_agent" and "<hierarchy>/notify_on_release" -> value

    @classmethod
    def capture(cls) -> HostState:
        knobs = {knob: value for knob in KNOBS if (value := _read(knob)) is not None}
        roots: dict[str, str] = {}
        if CGROUP_V1.is_dir():
            for hierarchy in sorted(CGROUP_V1.iterdir()):
                for name in ("release_agent", "notify_on_release"):
                    if (value := _read(hierarchy / name)) is not None:
                        roots[f"{hierarchy.name}/{name}"] = value
        return cls(knobs, roots)

    def changes(self, after: HostState) -> list[str]:
        """What differs, as `name: before -> after`; empty when the host is as it was."""
        out = []
        for mine, theirs in ((self.knobs, after.knobs), (self.cgroup_roots, after.cgroup_roots)):
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    out.append(f"{key}: {mine.get(key)!r} -> {theirs.get(key)!r}")
        return out

    def restore(self) -> None:
        """Undo a knob an escape changed, so one failure does not damage the machine for other suites."""
        for knob, value in self.knobs.items():
            if _read(knob) != value:
                try:
                    Path(knob).write_text(value)
                except OSError:
                    pass


def mounts_with(token: str) -> list[str]:
    """Host mount table lines naming the token (a mount an escape made would carry it in its path)."""
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if token in line]


def cgroups_with(token: str) -> list[str]:
    """Cgroup directories on the host named with the token, in any v1 hierarchy (at most 3 levels deep)."""
    found: list[str] = []

    def walk(directory: str, depth: int) -> None:
        try:  # other suites create and remove cgroups meanwhile: a directory may vanish while it is listed
            entries = [e for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if token in entry.name:
                found.append(entry.path)
            if depth < 3:
                walk(entry.path, depth + 1)

    if CGROUP_V1.is_dir():
        for hierarchy in CGROUP_V1.iterdir():
            walk(str(hierarchy), 1)
    return found


def processes_with(token: str) -> list[int]:
    """Host pids whose command line contains the token."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if token.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def user_namespace(pid: int | str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/user")
    except OSError:
        return ""


def keys_with(token: str) -> list[str]:
    """Host kernel keys (all users', as root) whose description contains the token."""
    return [line for line in (_read("/proc/keys") or "").splitlines() if token in line]


def tracer_of(pid: int) -> int:
    """The TracerPid of a host process (0 = not traced)."""
    match = re.search(r"^TracerPid:\s+(\d+)", _read(f"/proc/{pid}/status") or "", re.M)
    return int(match.group(1)) if match else 0


def listening_ports() -> set[int]:
    """TCP ports (v4 and v6) the host's network namespace listens on."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in (_read(table) or "").splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def kernel_log_cursor() -> str:
    """The kernel log's last line now (timestamped, so unique); `kernel_log_since` reads what comes after it.

    Not a line count: once the ring buffer is full its length stays the same while new lines push old ones out."""
    lines = _kernel_log()
    return lines[-1] if lines else ""


def kernel_log_since(cursor: str) -> list[str]:
    lines = _kernel_log()
    for index in range(len(lines) - 1, -1, -1):
        if lines[index] == cursor:
            return lines[index + 1 :]
    return lines  # the cursor line itself was pushed out: everything there is is newer


def _kernel_log() -> list[str]:
    result = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30, check=False)
    return result.stdout.splitlines()


def host_oom_kills(lines: list[str]) -> list[str]:
    """Kernel log lines of a *host* OOM kill: the global killer's "Out of memory:", not a memory cgroup's."""
    return [line for line in lines if "Out of memory" in line and "Memory cgroup" not in line]


def block_device_head_sha256(major_minor: str) -> str | None:
    """sha256 of the first 64 KiB of the host's block device `major:minor`, or None if it has none.

    Read through a node made for the purpose: this host has no udev, so /dev/block/M:m does not exist."""
    try:
        major, minor = (int(part) for part in major_minor.split(":"))
    except ValueError:
        return None
    with tempfile.TemporaryDirectory() as scratch:
        node = Path(scratch) / "dev"
        try:
            os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(major, minor))
            with open(node, "rb") as device:
                return hashlib.sha256(device.read(65536)).hexdigest()
        except OSError:
            return None


def fds_with(pid: int, token: str) -> list[str]:
    """Open file descriptors of a host process whose target names the token."""
    found = []
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in entries:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if token in target:
            found.append(f"{fd}->{target}")
    return found


def leftovers(sandbox_ids: list[str]) -> list[str]:
    """What the given sandboxes left on the host once their server stopped: cgroups, mounts, loop devices,
    registrations, network namespaces and processes named with their ids (a stopped server destroys every
    sandbox before `stop()` returns, so anything here outlived its owner)."""
    ids = set(sandbox_ids)
    found: list[str] = []
    if CGROUP_V1.is_dir():
        for hierarchy in CGROUP_V1.iterdir():
            parent = hierarchy / "dsec"
            if parent.is_dir():
                found += [f"cgroup {hierarchy.name}/dsec/{p.name}" for p in parent.iterdir() if p.name in ids]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        found += [f"mount {line.split()[4]}" for sid in ids if sid in line]
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        text = _read(backing) or ""
        found += [f"loop {backing.parts[3]} on {text}" for sid in ids if sid in text]
    for directory, prefix in ((Path("/run/dsec/sandboxes"), ""), (Path("/run/netns"), "dsec-")):
        if directory.is_dir():
            found += [f"{directory}/{p.name}" for p in directory.iterdir() if p.name.removeprefix(prefix) in ids]
    for sid in ids:
        found += [f"process {pid} naming {sid}" for pid in processes_with(sid)]
    return found
