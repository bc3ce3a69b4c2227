"""What a process inside a crun/runc sandbox can see and do: namespaces, limits, privileges."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from dsec.models import Resources, SandboxSpec
from dsec.substrates.container import bundle, cgroups

from .conftest import run, sh

CAP_NUMBERS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6,
    "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_NET_BIND_SERVICE": 10, "CAP_SYS_CHROOT": 18,
}


def status_field(status: str, name: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith(name + ":"))


@pytest.mark.timeout(120)
def test_pid_uts_and_network_namespaces(make_sandbox):
    sb = make_sandbox()
    assert sh(sb, "cat /proc/1/cmdline | tr '\\0' ' '") == "/.dsec/agent --listen /.dsec/run/agent.sock "
    pids = [int(p) for p in sh(sb, "ls /proc").split() if p.isdigit()]
    assert max(pids) < 100 and len(pids) < 10, f"only the sandbox's own processes are visible: {pids}"
    assert sh(sb, "hostname") == sb.sandbox_id + "\n"
    assert sh(sb, "ls /sys/class/net").split() == ["lo"], "no network interface but lo without network=True"


@pytest.mark.timeout(120)
def test_network_true_shares_the_host_network(make_sandbox):
    sb = make_sandbox(SandboxSpec(network=True))
    inside = set(sh(sb, "ls /sys/class/net").split())
    host = set(os.listdir("/sys/class/net"))
    assert "lo" in inside and (inside - {"lo"}) & (host - {"lo"}), f"host interfaces visible: {inside} vs {host}"
    if Path("/etc/resolv.conf").exists():
        assert sh(sb, "cat /etc/resolv.conf") == Path("/etc/resolv.conf").read_text()


@pytest.mark.timeout(120)
def test_privileges_are_trimmed(make_sandbox):
    sb = make_sandbox()
    status = sh(sb, "cat /proc/self/status")
    assert status_field(status, "NoNewPrivs") == "1"
    assert status_field(status, "Seccomp") == "2", "the seccomp filter is on"
    expected = sum(1 << CAP_NUMBERS[name] for name in bundle.CAPABILITIES)
    assert int(status_field(status, "CapEff"), 16) == expected
    assert int(status_field(status, "CapBnd"), 16) == expected, "CAP_NET_RAW, CAP_SYS_ADMIN… are not even bounding"
    _, err, exited = run(sb, ["mount", "-t", "tmpfs", "none", "/mnt"])
    assert exited.exit_code != 0 and (b"denied" in err.lower() or b"not permitted" in err.lower()), err
    _, err, exited = run(sb, ["unshare", "-U", "true"])
    assert exited.exit_code != 0, "no new user namespace (it would regain every capability)"
    assert sh(sb, "cat /proc/kcore | wc -c").strip() == "0", "/proc/kcore is masked"
    _, _, exited = run(sb, ["sh", "-c", "echo 1 > /proc/sys/kernel/panic"])
    assert exited.exit_code != 0, "/proc/sys is read-only"
    nofile = sh(sb, "ulimit -n").strip()
    assert int(nofile) <= 20_000


@pytest.mark.timeout(120)
def test_limits_are_in_the_cgroups(make_sandbox):
    sb = make_sandbox(SandboxSpec(resources=Resources(cpu=0.5, memory_mb=64, pids=32)))
    path = sb.record.cgroups_path
    assert cgroups.cpu_quota(path) == (50_000, 100_000)
    assert sb.memory_limit_mb() == 64
    memsw = cgroups.controller_dir("memory", path) / "memory.memsw.limit_in_bytes"
    if memsw.exists():  # swap accounting on: memory+swap is capped at the memory limit
        assert int(memsw.read_text()) == 64 << 20
    assert cgroups.pids_limit(path) == 32
    pid = int((sb.files / "container.pid").read_text())
    assert f":/dsec/{sb.sandbox_id}" in Path(f"/proc/{pid}/cgroup").read_text()


@pytest.mark.timeout(120)
def test_pids_limit_stops_a_fork_bomb(make_sandbox):
    sb = make_sandbox(SandboxSpec(resources=Resources(pids=32)))
    _, err, _ = run(sb, ["sh", "-c", "for i in $(seq 100); do sleep 30 & done; wait"])
    assert b"fork" in err.lower() or b"resource" in err.lower(), err
    current = cgroups.controller_dir("pids", sb.record.cgroups_path) / "pids.current"
    assert int(current.read_text()) <= 32
    run(sb, ["kill", "-9", "-1"])
    assert sh(sb, "echo alive") == "alive\n", "the agent survives the bomb and serves again"


@pytest.mark.timeout(120)
def test_memory_limit_oom_kill_is_counted(make_sandbox):
    sb = make_sandbox(SandboxSpec(resources=Resources(memory_mb=32)))
    assert sb.oom_kill_count() == 0
    _, _, exited = run(sb, ["sh", "-c", "head -c 200m /dev/zero | tail"])
    assert exited.exit_code != 0 or exited.signal == signal.SIGKILL
    assert sb.oom_kill_count() >= 1
    assert sh(sb, "echo ok") == "ok\n", "the agent (PID 1) is not the OOM victim"
