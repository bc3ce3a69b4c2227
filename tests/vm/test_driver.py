"""The QEMU drivers below the server: processes, files, limits, snapshot/restore/fork, pause, accelerator."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dsec.errors import (
    CommandNotFound,
    FileNotFoundInSandbox,
    InvalidSpec,
    SandboxStateError,
    SnapshotNotFound,
    Unsupported,
)
from dsec.models import SandboxSpec
from dsec.substrates.vm.accel import probe_record
from dsec.substrates.vm.template import prune_templates
from .conftest import MEMORY_MB, run

pytestmark = pytest.mark.timeout(300)


def test_exec_files_and_errors(driver, busybox_image, make_vm):
    sb = make_vm(driver, busybox_image)
    assert run(sb, "echo out; echo err >&2; exit 3") == (b"out\n", b"err\n", 3)
    assert sb.write_file("/root/data.bin", [b"\x00\xffabc", b"def"]) == 8
    assert b"".join(sb.read_file("/root/data.bin")) == b"\x00\xffabcdef"
    assert "data.bin" in {entry.name for entry in sb.list_dir("/root")}
    with pytest.raises(FileNotFoundInSandbox):
        b"".join(sb.read_file("/root/missing"))
    with pytest.raises(CommandNotFound):
        sb.spawn(["/no/such/binary"], {}, "/")


def test_accel_is_reported_and_cached(driver, busybox_image, make_vm):
    sb = make_vm(driver, busybox_image)
    record = probe_record(driver.cfg)
    assert sb.accel == record["accel"] in ("kvm", "tcg")
    assert record["reason"]


def test_resources_become_guest_memory_and_cpus(microvm_driver, busybox_image, make_vm):
    sb = make_vm(microvm_driver, busybox_image, cpu=1.5)
    out, _, code = run(sb, "grep MemTotal /proc/meminfo; grep -c ^processor /proc/cpuinfo")
    assert code == 0
    mem_kb = int(out.split()[1])
    assert MEMORY_MB * 1024 * 0.7 < mem_kb <= MEMORY_MB * 1024
    assert out.split()[-1] == b"2", "cpu=1.5 rounds up to 2 vCPUs"
    assert sb.memory_limit_mb() == MEMORY_MB


def test_guest_oom_kills_the_hog_not_the_agent(microvm_driver, busybox_image, make_vm):
    sb = make_vm(microvm_driver, busybox_image)
    before = sb.oom_kill_count()
    assert before >= 0
    # `tail` buffers the one endless line of /dev/zero until the guest OOM killer stops it.
    _, _, code = run(sb, "tail /dev/zero")
    assert code != 0
    assert sb.oom_kill_count() > before
    assert run(sb, "echo alive")[0] == b"alive\n", "the agent (PID 1) survives the OOM kill"


def test_snapshot_restore_and_fork_keep_disk_and_memory(driver, busybox_image, make_vm, tmp_path: Path):
    sb = make_vm(driver, busybox_image)
    sb.write_file("/root/on-disk", [b"disk state"])
    run(sb, "echo memory state > /dev/shm/in-ram; (while true; do sleep 1; done) & echo $! > /dev/shm/pid")
    snap = tmp_path / "snap"
    assert sb.snapshot(snap) == "memory+disk"
    sb.write_file("/root/on-disk", [b"changed after the snapshot"])
    assert run(sb, "sync; echo still running") == (b"still running\n", b"", 0), "the source continues, disk too"

    forks = [make_vm(driver, busybox_image, snapshot=snap) for _ in range(2)]
    for index, fork in enumerate(forks):
        assert b"".join(fork.read_file("/root/on-disk")) == b"disk state"
        assert b"".join(fork.read_file("/dev/shm/in-ram")) == b"memory state\n"
        out, _, code = run(fork, "kill -0 $(cat /dev/shm/pid) && echo process-alive")
        assert (out, code) == (b"process-alive\n", 0), "processes from the snapshot keep running"
        fork.write_file("/root/mine", [str(index).encode()])
    assert [b"".join(f.read_file("/root/mine")) for f in forks] == [b"0", b"1"], "forks are independent"
    assert b"".join(sb.read_file("/root/on-disk")) == b"changed after the snapshot"


def test_pause_resume_keeps_file_and_memory_changes(microvm_driver, busybox_image, make_vm):
    sb = make_vm(microvm_driver, busybox_image)
    sb.write_file("/root/before-pause", [b"written before pause"])
    run(sb, "echo 42 > /dev/shm/counter; (while true; do sleep 1; done) & echo $! > /dev/shm/pid")
    sb.pause()
    time.sleep(0.5)
    sb.resume()
    assert b"".join(sb.read_file("/root/before-pause")) == b"written before pause"
    assert b"".join(sb.read_file("/dev/shm/counter")) == b"42\n"
    assert run(sb, "kill -0 $(cat /dev/shm/pid) && echo alive")[0] == b"alive\n"
    sb.write_file("/root/after-resume", [b"ok"])
    assert b"".join(sb.read_file("/root/after-resume")) == b"ok"


def test_dead_vm_is_reported_not_hung(microvm_driver, busybox_image, make_vm):
    sb = make_vm(microvm_driver, busybox_image)
    sb.process.kill()
    with pytest.raises(SandboxStateError):
        sb.pause()


def test_prune_keeps_recent_templates(microvm_driver, tmp_path: Path):
    cfg = microvm_driver.cfg.model_copy(update={"root": tmp_path})
    cfg.templates_dir.mkdir(parents=True)
    for index in range(3):
        directory = cfg.templates_dir / f"t{index}"
        directory.mkdir()
        (directory / "meta.json").write_text("{}")
        os.utime(directory / "meta.json", (1000.0 + index, 1000.0 + index))
    (cfg.templates_dir / "fresh").mkdir()
    (cfg.templates_dir / "fresh" / "meta.json").write_text("{}")
    removed = prune_templates(cfg, keep=2)
    assert sorted(p.name for p in removed) == ["t0", "t1"]
    assert sorted(p.name for p in cfg.templates_dir.iterdir()) == ["fresh", "t2"]


def test_bad_requests_get_typed_errors(microvm_driver, busybox_image, tmp_path: Path):
    with pytest.raises(Unsupported):
        microvm_driver.create("sb-net", SandboxSpec(substrate="microvm", network=True), busybox_image, tmp_path / "a")
    other = "kvm" if microvm_driver.accel == "tcg" else "tcg"
    with pytest.raises(InvalidSpec):
        microvm_driver.create("sb-acc", SandboxSpec(substrate="microvm", driver=other), busybox_image, tmp_path / "b")
    (tmp_path / "not-a-snapshot").mkdir()
    with pytest.raises(SnapshotNotFound):
        microvm_driver.restore("sb-r", SandboxSpec(substrate="microvm"), busybox_image, tmp_path / "not-a-snapshot", tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_snapshot_of_paused_vm_stays_paused_and_restores_running(microvm_driver, busybox_image, make_vm, tmp_path: Path):
    sb = make_vm(microvm_driver, busybox_image)
    sb.write_file("/root/paused-state", [b"kept"])
    sb.pause()
    sb.snapshot(tmp_path / "snap")
    assert sb.process.qmp.execute("query-status")["status"] != "running"
    restored = make_vm(microvm_driver, busybox_image, snapshot=tmp_path / "snap")
    assert b"".join(restored.read_file("/root/paused-state")) == b"kept"
    sb.resume()
    assert run(sb, "echo resumed > /root/after; sync; cat /root/after") == (b"resumed\n", b"", 0), "disk writable again"
    assert sb.process.alive()
