"""The host-side detectors see what an escape would leave: each is shown a real trace made on the host.

A detector that can never fire would make every attempt look contained, so each one is checked against the
thing it looks for, made here on the host by the test itself (no sandbox involved).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import time
from pathlib import Path

from . import host


def test_mounts_with_sees_a_mount_named_with_the_token(tmp_path):
    token = secrets.token_hex(5)
    point = tmp_path / f"m-{token}"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(point)], check=True)
    try:
        assert host.mounts_with(token)
    finally:
        subprocess.run(["umount", str(point)], check=True)
    assert not host.mounts_with(token)


def test_cgroups_with_sees_a_cgroup_named_with_the_token():
    token = secrets.token_hex(5)
    cgroup = host.CGROUP_V1 / "pids" / f"dsec-hostcheck-{token}"
    cgroup.mkdir()
    try:
        assert str(cgroup) in host.cgroups_with(token)
    finally:
        cgroup.rmdir()


def test_processes_and_user_namespaces_are_seen():
    marker = str(7_000_000 + secrets.randbelow(1_000_000))
    process = subprocess.Popen(["unshare", "-U", "-r", "sleep", marker])
    try:
        pids = []
        while not pids and process.poll() is None:  # until exec has replaced unshare by sleep
            pids = host.processes_with(f"sleep\0{marker}")
            time.sleep(0.01)
        assert pids and host.user_namespace(pids[0]) != host.user_namespace(1)
    finally:
        process.kill()
        process.wait()


def test_host_state_reports_every_changed_value():
    before = host.HostState({"/proc/sys/kernel/core_pattern": "core"}, {"memory/release_agent": ""})
    after = host.HostState({"/proc/sys/kernel/core_pattern": "|/payload"}, {"memory/release_agent": "/x"})
    assert len(before.changes(after)) == 2


def test_block_device_hash_matches_what_a_reader_of_the_device_sees(tmp_path):
    image = tmp_path / "dev.img"
    image.write_bytes(secrets.token_bytes(1 << 20))
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True).stdout.strip()
    try:
        major_minor = Path(f"/sys/block/{Path(loop).name}/dev").read_text().strip()
        assert host.block_device_head_sha256(major_minor) == hashlib.sha256(image.read_bytes()[:65536]).hexdigest()
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def test_kernel_log_since_sees_new_lines_and_oom_filter_tells_host_from_cgroup():
    token = secrets.token_hex(5)
    cursor = host.kernel_log_cursor()
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(f"dsec-hostcheck {token}\n")
    assert any(token in line for line in host.kernel_log_since(cursor))
    lines = ["Memory cgroup out of memory: Killed process 1 (sh)", "Out of memory: Killed process 2 (python3)"]
    assert host.host_oom_kills(lines) == [lines[1]]


def test_fds_and_tracers_are_read_from_proc(tmp_path):
    token = secrets.token_hex(5)
    held = tmp_path / f"fd-{token}"
    held.mkdir()
    fd = os.open(held, os.O_RDONLY)
    try:
        assert host.fds_with(os.getpid(), token)
    finally:
        os.close(fd)
    assert host.tracer_of(os.getpid()) == 0


def test_leftovers_sees_a_cgroup_and_a_mount_named_for_a_sandbox(tmp_path):
    sandbox_id = f"ct-hostcheck-{secrets.token_hex(4)}"  # not a server's sb- id: no orphan sweep removes it meanwhile
    cgroup = host.CGROUP_V1 / "pids" / "dsec" / sandbox_id
    cgroup.mkdir(parents=True)
    point = tmp_path / sandbox_id
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(point)], check=True)
    try:
        found = host.leftovers([sandbox_id])
        assert any(item.startswith("cgroup pids/dsec/") for item in found), found
        assert any(item.startswith("mount ") for item in found), found
    finally:
        subprocess.run(["umount", str(point)], check=True)
        cgroup.rmdir()
    assert host.leftovers([sandbox_id]) == []
