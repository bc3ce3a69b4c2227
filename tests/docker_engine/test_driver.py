"""The Docker driver against the real engine and the real agent: exec, files, limits, OOM, teardown, crash cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dsec.errors import CommandNotFound, FileNotFoundInSandbox, RuntimeFailure, SnapshotNotFound
from dsec.models import Resources, SandboxSpec

from .conftest import run

CAP_NET_RAW = 13


def spec(**resources) -> SandboxSpec:
    return SandboxSpec(image="test-busybox", resources=Resources(**resources), env={"FROM_SPEC": "1"})


def containers_labelled(docker_client, key: str, value: str) -> list:
    return docker_client.containers.list(all=True, filters={"label": f"{key}={value}"})


@pytest.mark.timeout(120)
def test_exec_argv_env_cwd_stdin_exit_code(make_sandbox):
    sb = make_sandbox(spec())
    script = 'echo "$EXTRA"; pwd; cat; echo e >&2; exit 7'
    out, err, exited = run(sb, ["/bin/sh", "-c", script], env={"EXTRA": "x y"}, cwd="/tmp", stdin=b"in")
    assert out == b"x y\n/tmp\nin", "the driver passes exactly the env it is given (the server merges image env)"
    assert err == b"e\n"
    assert exited.exit_code == 7
    assert run(sb, ["cat", "/etc/layer"])[0] == b"top\n"
    with pytest.raises(CommandNotFound):
        sb.spawn(["/no/such/binary"], {}, "/")
    assert run(sb, ["echo", "still alive"])[0] == b"still alive\n"


@pytest.mark.timeout(120)
def test_files_write_read_list_and_typed_errors(make_sandbox):
    sb = make_sandbox(spec())
    payload = bytes(range(256)) * 4096
    assert sb.write_file("/work/deep/blob.bin", [payload[:1000], payload[1000:]]) == len(payload)
    assert b"".join(sb.read_file("/work/deep/blob.bin")) == payload
    entries = {e.name: e for e in sb.list_dir("/work/deep")}
    assert entries["blob.bin"].type == "file" and entries["blob.bin"].size == len(payload)
    assert run(sb, ["wc", "-c", "/work/deep/blob.bin"])[0].split()[0] == str(len(payload)).encode()
    with pytest.raises(FileNotFoundInSandbox):
        b"".join(sb.read_file("/no/such/file"))


@pytest.mark.timeout(120)
def test_limits_are_applied(make_sandbox, driver):
    sb = make_sandbox(spec(memory_mb=64, pids=32, cpu=0.5))
    host = driver.api.inspect_container(sb.container)["HostConfig"]
    assert host["Memory"] == host["MemorySwap"] == 64 << 20
    assert host["PidsLimit"] == 32
    assert host["NanoCpus"] == 500_000_000
    assert host["NetworkMode"] == "none"
    assert "no-new-privileges" in host["SecurityOpt"]
    assert sb.memory_limit_mb() == 64
    status = run(sb, ["cat", "/proc/self/status"])[0].decode()
    cap_eff = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff")), 16)
    assert not cap_eff & (1 << CAP_NET_RAW), "NET_RAW must be dropped"
    assert "NoNewPrivs:\t1" in status
    assert run(sb, ["ls", "/sys/class/net"])[0].split() == [b"lo"], "no network unless the spec asks for it"
    out, err, _ = run(sb, ["sh", "-c", "for i in $(seq 60); do sleep 5 & done; wait"])
    assert b"fork" in err.lower() or b"resource" in err.lower(), err
    run(sb, ["kill", "-9", "-1"])


@pytest.mark.timeout(120)
def test_oom_kill_is_counted_and_the_sandbox_survives(make_sandbox):
    sb = make_sandbox(spec(memory_mb=32))
    assert sb.oom_kill_count() == 0
    _, _, exited = run(sb, ["sh", "-c", "head -c 200m /dev/zero | tail"])
    assert exited.exit_code != 0 or exited.signal == signal.SIGKILL
    assert sb.oom_kill_count() >= 1
    assert run(sb, ["echo", "ok"])[0] == b"ok\n"


@pytest.mark.timeout(120)
def test_pause_and_resume(make_sandbox, driver, tmp_path):
    sb = make_sandbox(spec())
    sb.pause()
    assert sb.snapshot(tmp_path / "snap") == "filesystem"
    assert driver.api.inspect_container(sb.container)["State"]["Paused"], "a paused sandbox stays paused across a snapshot"
    sb.resume()
    assert run(sb, ["echo", "resumed"])[0] == b"resumed\n"


@pytest.mark.timeout(120)
def test_destroy_removes_the_container_and_is_idempotent(driver, busybox_image, docker_client, state_dir):
    from dsec.substrates.container.docker_driver import SANDBOX_LABEL

    sandbox_id = f"t{os.urandom(6).hex()}"
    sb = driver.create(sandbox_id, spec(), busybox_image, state_dir)
    assert len(containers_labelled(docker_client, SANDBOX_LABEL, sandbox_id)) == 1
    driver.destroy(sb)
    driver.destroy(sb)
    assert containers_labelled(docker_client, SANDBOX_LABEL, sandbox_id) == []


@pytest.mark.timeout(120)
def test_duplicate_sandbox_id_fails_typed_and_leaves_the_first_alone(make_sandbox, driver, busybox_image, tmp_path):
    sb = make_sandbox(spec(), sandbox_id=f"t{os.urandom(6).hex()}")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(RuntimeFailure, match=sb.sandbox_id):
        driver.create(sb.sandbox_id, spec(), busybox_image, other)
    assert run(sb, ["echo", "first"])[0] == b"first\n"


@pytest.mark.timeout(180)
def test_cleanup_after_the_owning_server_was_killed(driver, busybox_image, docker_client, tmp_path):
    """A server creates a sandbox and dies by SIGKILL; a new driver cleans up from the state directory alone."""
    from dsec.substrates.container.docker_driver import STATE_DIR_LABEL

    state = tmp_path / "dead-server-sandbox"
    state.mkdir()
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from dsec.config import ServerConfig
        from dsec.models import SandboxSpec
        from dsec.substrates.base import ImageConfig, ImageRootfs
        from dsec.substrates.container.docker_driver import DockerDriver
        image = ImageRootfs("test-busybox", {busybox_image.digest!r}, [Path(p) for p in {[str(d) for d in busybox_image.lower_dirs]!r}], ImageConfig())
        DockerDriver(ServerConfig(home=Path(os.environ["DSEC_HOME"]))).create("deadsrv{os.urandom(4).hex()}", SandboxSpec(), image, Path({str(state)!r}))
        print("ready", flush=True)
        import time; time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    finally:
        proc.kill()
        proc.wait()
    assert len(containers_labelled(docker_client, STATE_DIR_LABEL, str(state.resolve()))) == 1
    driver.cleanup_state_dir(state)
    assert containers_labelled(docker_client, STATE_DIR_LABEL, str(state.resolve())) == []
    driver.cleanup_state_dir(state)


@pytest.mark.timeout(180)
def test_snapshot_and_restore_keep_written_and_deleted_files(make_sandbox, driver, busybox_image, tmp_path):
    sb = make_sandbox(spec())
    sb.write_file("/work/notes.txt", [b"kept\n"])
    run(sb, ["sh", "-c", "rm /etc/layer && mkdir -p /opaque && echo x > /opaque/f"])
    snap = tmp_path / "snap"
    assert sb.snapshot(snap) == "filesystem"
    assert run(sb, ["echo", "running"])[0] == b"running\n", "the source keeps running after a snapshot"
    sb.write_file("/work/after.txt", [b"not in the snapshot\n"])

    sandbox_id = f"t{os.urandom(6).hex()}"
    state = tmp_path / sandbox_id
    state.mkdir()
    restored = driver.restore(sandbox_id, spec(), busybox_image, snap, state)
    try:
        assert b"".join(restored.read_file("/work/notes.txt")) == b"kept\n"
        assert run(restored, ["cat", "/opaque/f"])[0] == b"x\n"
        _, _, missing = run(restored, ["cat", "/etc/layer"])
        assert missing.exit_code != 0, "a file deleted before the snapshot stays deleted"
        assert run(restored, ["ls", "/work"])[0].split() == [b"notes.txt"]
    finally:
        driver.destroy(restored)


@pytest.mark.timeout(60)
def test_restore_from_a_vm_snapshot_fails_typed(driver, busybox_image, tmp_path):
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "memory.state").write_bytes(b"not a filesystem snapshot")
    with pytest.raises(SnapshotNotFound, match="no filesystem snapshot"):
        driver.restore("tforeign", spec(), busybox_image, tmp_path / "snap", tmp_path)


@pytest.mark.timeout(180)
def test_snapshots_move_between_docker_and_crun(make_sandbox, driver, busybox_image, tmp_path):
    """Both drivers snapshot the overlay upper dir as a tar, so a fork may change driver."""
    from dsec.substrates.container.driver import container_driver

    crun = container_driver("crun", driver.config)
    sb = make_sandbox(spec())
    sb.write_file("/work/from-docker", [b"d\n"])
    sb.snapshot(tmp_path / "docker-snap")
    state = tmp_path / "crun-state"
    on_crun = crun.restore(f"t{os.urandom(6).hex()}", spec(), busybox_image, tmp_path / "docker-snap", state)
    try:
        assert b"".join(on_crun.read_file("/work/from-docker")) == b"d\n"
        on_crun.write_file("/work/from-crun", [b"c\n"])
        on_crun.snapshot(tmp_path / "crun-snap")
    finally:
        crun.destroy(on_crun)
    back_id = f"t{os.urandom(6).hex()}"
    (tmp_path / back_id).mkdir()
    back = driver.restore(back_id, spec(), busybox_image, tmp_path / "crun-snap", tmp_path / back_id)
    try:
        assert run(back, ["cat", "/work/from-docker", "/work/from-crun"])[0] == b"d\nc\n"
    finally:
        driver.destroy(back)
