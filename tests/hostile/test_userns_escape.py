"""Root in a sandbox is not root on the host (issue #22): judged on the host, with a simulated breakout.

- the sandbox's processes, found by its cgroup, run as an unprivileged host uid while `id -u` inside says 0;
- a breakout simulated at its worst: a process with every capability in the sandbox's user namespace, on the
  host's filesystem, holding a leaked descriptor of the host's / (the shape of runc's CVE-2024-21626 fd leak),
  tries root-only bait files and a write into /etc. It reaches only what any unprivileged host user reaches.
Docker's sandboxes share the engine's one remapped range (dockerd.py; daemon-wide, docs/hardening.md), found by
the engine's own process list; VMs (a guest's root is no host process) report n/a rows.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import docker
import pytest

from dsec.substrates.container import cgroups
from dsec.substrates.container.bundle import cgroups_path
from dsec.substrates.container.dockerd import REMAP_BASE, ensure_engine
from dsec.substrates.container.userns import HOST_BASE, IDS, SLOTS

from .conftest import is_vm
from .table import not_applicable, record

pytestmark = pytest.mark.timeout(300)
NSENTER_TIMEOUT_S = 60


def _not_user_namespaced(case: tuple) -> str:
    if is_vm(case):
        return "n/a: a guest's root is the guest kernel's, no host process"
    return ""


def _host_pids(case: tuple, sandbox_id: str) -> list[int]:
    if case[2] == "docker":  # the engine's cgroup layout is its own: ask it for the container's processes
        engine = docker.APIClient(base_url=ensure_engine(use_docker_host=False), version="auto")
        try:
            top = engine.top(f"dsec-{sandbox_id}")
        finally:
            engine.close()
        return [int(row[top["Titles"].index("PID")]) for row in top["Processes"]]
    directory = cgroups.controller_dir("memory", cgroups_path(sandbox_id))
    assert directory is not None, "no memory cgroup hierarchy"
    return [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]


def _uids(pid: int) -> list[int]:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
    return [int(v) for v in line.split()[1:]]


def test_sandbox_root_runs_as_an_unprivileged_host_uid(case, spawn):
    reason = _not_user_namespaced(case)
    if reason:
        not_applicable(case[0], "sandbox root is an unprivileged host uid", reason)
        return
    sandbox = spawn()
    inside = sandbox.exec(["/bin/sh", "-c", "id -u; cat /proc/self/uid_map"]).stdout.decode().split()
    pids = _host_pids(case, sandbox.id)
    uids = sorted({uid for pid in pids for uid in _uids(pid)})
    base = uids[0] if len(uids) == 1 else -1
    in_range = base == REMAP_BASE if case[2] == "docker" else HOST_BASE <= base < HOST_BASE + SLOTS * IDS
    contained = inside[:2] == ["0", "0"] and inside[2:] == [str(base), str(IDS)] and in_range and len(pids) >= 1
    outcome = f"inside uid {inside[0]} map {' '.join(inside[1:])}; host uids {uids} of {len(pids)} pids"
    assert record(case[0], "sandbox root is an unprivileged host uid", outcome, contained)


def test_breakout_with_a_leaked_host_root_fd_reads_no_root_file(case, spawn, bait):
    reason = _not_user_namespaced(case)
    if reason:
        not_applicable(case[0], "breakout via leaked host / fd as sandbox root", reason)
        return
    secret, paths = bait
    for path in paths:
        path.chmod(0o600)  # root's own: only host root (or a mapped owner) may read them
    readable = Path("/tmp") / f"dsec-hostile-public-{secrets.token_hex(4)}"
    readable.write_text("public\n")
    readable.chmod(0o644)
    target = Path("/etc") / f"dsec-hostile-{secrets.token_hex(4)}"
    sandbox = spawn()
    pid = _host_pids(case, sandbox.id)[0]
    host_root = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = f"/proc/self/fd/{host_root}"
        script = (
            f"id -u; for f in {fd}{paths[0]} {fd}{paths[1]}; do cat $f 2>&1; done; cat {fd}{readable}; "
            f"echo pwned > {fd}{target} 2>&1; echo done"
        )
        proc = subprocess.run(
            ["nsenter", f"--target={pid}", "--user", "--", "/bin/sh", "-c", script],
            capture_output=True, pass_fds=(host_root,), timeout=NSENTER_TIMEOUT_S, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        os.close(host_root)
        readable.unlink(missing_ok=True)
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    wrote = target.exists()
    target.unlink(missing_ok=True)
    lines = proc.stdout.decode(errors="replace").splitlines()
    contained = (  # it ran as root in its namespace, its fd reached the host, yet both baits and /etc refused
        lines[:1] == ["0"] and "public" in lines and lines[-1:] == ["done"]
        and secret not in out and not wrote and out.count("Permission denied") >= 3
    )  # fmt: skip
    outcome = f"root in its userns: bait denied, /etc write denied ({len(lines)} lines)" if contained else out[-80:]
    assert record(case[0], "breakout via leaked host / fd as sandbox root", outcome, contained), out
