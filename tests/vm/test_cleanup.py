"""Nothing a VM sandbox starts outlives it: QEMU, sockets and the disk overlay, also after kill -9 of its owner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dsec.substrates.vm.machine import PID_FILE

pytestmark = pytest.mark.timeout(240)

OWNER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dsec.config import ServerConfig
    from dsec.models import SandboxSpec
    from dsec.substrates.base import ImageConfig, ImageRootfs
    from dsec.substrates.vm import vm_driver

    root, digest, state_dir = sys.argv[1:4]
    image = ImageRootfs("vm-test-busybox", digest, [Path(root)], ImageConfig())
    driver = vm_driver("microvm", ServerConfig())
    spec = SandboxSpec(substrate="microvm", resources={"memory_mb": 256})
    sandbox = driver.create("sb-orphan", spec, image, Path(state_dir))
    print("ready", flush=True)
    time.sleep(600)
    """
)


def _qemu_pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and text.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def test_kill9_of_owner_kills_qemu_and_cleanup_state_dir_leaves_nothing(microvm_driver, busybox_image, tmp_path: Path):
    state_dir = tmp_path / "sb-orphan"
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(busybox_image.lower_dirs[0]), busybox_image.digest, str(state_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = owner.stdout.readline()
        assert line.strip() == "ready", owner.stderr.read()
        qemu_pid = int((state_dir / PID_FILE).read_text())
        assert _qemu_pids_mentioning(str(state_dir)) == [qemu_pid]
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _qemu_pids_mentioning(str(state_dir)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _qemu_pids_mentioning(str(state_dir)) == [], "QEMU dies with its owner (parent-death signal)"
        assert (state_dir / "disk.qcow2").exists(), "files stay until cleanup_state_dir"

        microvm_driver.cleanup_state_dir(state_dir)

        assert _qemu_pids_mentioning(str(state_dir)) == []
        assert list(state_dir.iterdir()) == []
        microvm_driver.cleanup_state_dir(state_dir)  # idempotent
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for pid in _qemu_pids_mentioning(str(state_dir)):
            os.kill(pid, signal.SIGKILL)


def test_cleanup_ignores_a_reused_pid(microvm_driver, tmp_path: Path):
    """A pid file naming some unrelated live process must not get that process killed."""
    state_dir = tmp_path / "sb-stale"
    state_dir.mkdir()
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (state_dir / PID_FILE).write_text(str(bystander.pid))
        microvm_driver.cleanup_state_dir(state_dir)
        assert bystander.poll() is None
        assert list(state_dir.iterdir()) == []
    finally:
        bystander.kill()
        bystander.wait()
