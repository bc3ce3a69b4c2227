"""Create, exec, files and destroy on real crun and runc; nothing of a sandbox survives destroy or a dead server."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dsec.errors import CommandNotFound, DiskFull, FileNotFoundInSandbox, RuntimeFailure
from dsec.models import Resources, SandboxSpec
from dsec.substrates.base import ImageRootfs
from dsec.substrates.container import cgroups, rootfs, volatile
from dsec.substrates.container.driver import ContainerDriver, container_driver
from dsec.substrates.container.record import ContainerRecord

from .conftest import new_id, run, sh


def loop_backing_files() -> list[str]:
    files = []
    for path in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            files.append(path.read_text().strip())
        except OSError:
            pass  # detached meanwhile
    return files


def assert_gone(driver: ContainerDriver, sandbox_id: str, state_dir: Path, host_pid: int) -> None:
    """No process, mount, cgroup, runtime state or state dir of the sandbox is left on the host."""
    assert not Path(f"/proc/{host_pid}").exists() or "zombie" in Path(f"/proc/{host_pid}/status").read_text().lower()
    assert str(state_dir) not in Path("/proc/self/mounts").read_text()
    assert not [f for f in loop_backing_files() if f.startswith(str(state_dir))], "the disk's loop device is detached"
    assert cgroups.existing_dirs(f"/dsec/{sandbox_id}") == []
    assert sandbox_id not in driver.runtime.list()
    assert not state_dir.exists()
    files = volatile.sandbox_dir(driver.config.home, sandbox_id)  # bundle, socket dir, pid file, mount points
    assert str(files) not in Path("/proc/self/mounts").read_text()
    assert not files.exists()


@pytest.mark.timeout(120)
def test_exec_env_cwd_stdin_and_exit_code(make_sandbox):
    sb = make_sandbox(SandboxSpec(env={"FROM_SPEC": "1"}))
    out, err, exited = run(sb, ["sh", "-c", 'echo "$X"; pwd; cat; echo e >&2; exit 7'], {"X": "x y"}, "/tmp", b"in")
    assert (out, err, exited.exit_code) == (b"x y\n/tmp\nin", b"e\n", 7)
    env = sh(sb, "cat /proc/1/environ | tr '\\0' '\\n'")
    assert "FROM_IMAGE=1" in env and "FROM_SPEC=1" in env, "PID 1 gets the image env plus the spec env"
    assert sh(sb, "cat /etc/layer") == "busybox-test\n"
    with pytest.raises(CommandNotFound):
        sb.spawn(["/no/such/binary"], {}, "/")


@pytest.mark.timeout(120)
def test_files_through_the_agent_land_on_the_writable_layer(make_sandbox):
    sb = make_sandbox()
    payload = os.urandom(300_000)
    assert sb.write_file("/tmp/deep/blob.bin", [payload[:1000], payload[1000:]]) == len(payload)
    assert b"".join(sb.read_file("/tmp/deep/blob.bin")) == payload
    entries = {e.name: e for e in sb.list_dir("/tmp/deep")}
    assert entries["blob.bin"].type == "file" and entries["blob.bin"].size == len(payload)
    assert (sb.upper_dir / "tmp/deep/blob.bin").read_bytes() == payload, "/tmp is the overlay's upper dir, not a tmpfs"
    with pytest.raises(FileNotFoundInSandbox):
        b"".join(sb.read_file("/no/such/file"))


@pytest.mark.timeout(120)
def test_disk_budget_bounds_the_writable_layer(make_sandbox):
    sb = make_sandbox(SandboxSpec(resources=Resources(disk_mb=32)))
    out = sh(sb, "dd if=/dev/zero of=/fill bs=1M count=100 2>&1; wc -c < /fill")
    assert "No space left" in out
    assert int(out.split()[-1]) <= 32 << 20
    with pytest.raises(DiskFull):
        sb.write_file("/tmp/more", [b"x" * (4 << 20)])
    sh(sb, "rm /fill")
    assert sb.write_file("/tmp/more", [b"x" * (4 << 20)]) == 4 << 20, "deleting frees the budget again"
    image = Path(sb.record.disk_image)
    assert image.stat().st_blocks * 512 < 16 << 20, "the disk image is sparse and gives deleted blocks back"


@pytest.mark.timeout(120)
def test_destroy_removes_processes_mounts_cgroups_and_state(driver, busybox_image, tmp_path):
    sandbox_id = new_id()
    state_dir = tmp_path / sandbox_id
    sb = driver.create(sandbox_id, SandboxSpec(), busybox_image, state_dir)
    host_pid = int((sb.files / "container.pid").read_text())
    run(sb, ["sh", "-c", "sleep 600 & sleep 600 & echo started"])
    assert sb.record.rootfs in Path("/proc/self/mounts").read_text()
    assert cgroups.existing_dirs(f"/dsec/{sandbox_id}"), "the runtime created the sandbox's cgroups"
    assert sandbox_id in driver.runtime.list()
    driver.destroy(sb)
    assert_gone(driver, sandbox_id, state_dir, host_pid)
    driver.destroy(sb)  # idempotent
    with pytest.raises(RuntimeFailure):
        sb.spawn(["true"], {}, "/")


@pytest.mark.timeout(120)
def test_a_long_state_dir_path_still_reaches_the_agent(driver, busybox_image, tmp_path):
    state_dir = tmp_path / ("x" * 90) / new_id()
    assert len(str(state_dir / "agent-run/agent.sock")) > 108, "longer than a unix socket path may be"
    sb = driver.create(state_dir.name, SandboxSpec(), busybox_image, state_dir)
    try:
        assert sh(sb, "echo ok") == "ok\n"
    finally:
        driver.destroy(sb)


@pytest.mark.timeout(120)
def test_failed_create_leaves_nothing(driver, busybox_image, tmp_path):
    missing = ImageRootfs("gone", "sha256:" + "1" * 64, [tmp_path / "no-such-layer"], busybox_image.config)
    sandbox_id = new_id()
    with pytest.raises(RuntimeFailure):
        driver.create(sandbox_id, SandboxSpec(), missing, tmp_path / sandbox_id)
    assert not (tmp_path / sandbox_id).exists()
    # the runtime itself refuses: the working directory is a file
    sandbox_id = new_id()
    with pytest.raises(RuntimeFailure, match=sandbox_id):
        driver.create(sandbox_id, SandboxSpec(workdir="/etc/layer"), busybox_image, tmp_path / sandbox_id)
    assert str(tmp_path / sandbox_id) not in Path("/proc/self/mounts").read_text()
    assert cgroups.existing_dirs(f"/dsec/{sandbox_id}") == []
    assert sandbox_id not in driver.runtime.list()
    assert not (tmp_path / sandbox_id).exists()


CRASHING_SERVER = textwrap.dedent(
    """
    import os, pickle, sys
    from pathlib import Path
    from dsec.config import ServerConfig
    from dsec.models import Resources, SandboxSpec
    from dsec.substrates.container.driver import container_driver
    name, home, image_file, sandbox_id, state_dir = sys.argv[1:]
    image = pickle.loads(Path(image_file).read_bytes())
    sb = container_driver(name, ServerConfig(home=home)).create(sandbox_id, SandboxSpec(), image, Path(state_dir))
    proc = sb.spawn(["sh", "-c", "sleep 600 & sleep 600 & wait"], {"PATH": "/bin"}, "/")
    print("ready", flush=True)
    os.kill(os.getpid(), 9)
    """
)


@pytest.mark.timeout(180)
def test_cleanup_state_dir_after_the_server_was_killed(driver, busybox_image, config, tmp_path):
    import pickle

    image_file = tmp_path / "image.pickle"
    image_file.write_bytes(pickle.dumps(busybox_image))
    sandbox_id = new_id()
    state_dir = tmp_path / sandbox_id
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_SERVER, driver.name, str(config.home), str(image_file), sandbox_id, str(state_dir)],
        capture_output=True, timeout=120,
    )
    assert proc.returncode == -9 and b"ready" in proc.stdout, proc.stderr
    record = ContainerRecord.read(state_dir)
    assert record is not None
    host_pid = int((record.files_dir(state_dir) / "container.pid").read_text())
    assert Path(f"/proc/{host_pid}").exists(), "the sandbox outlives its server until it is cleaned"
    fresh = container_driver(driver.name, config)  # a new server: no live object, only the directory
    fresh.cleanup_state_dir(state_dir)
    assert_gone(fresh, sandbox_id, state_dir, host_pid)
    fresh.cleanup_state_dir(state_dir)  # nothing left to do is fine


@pytest.mark.timeout(60)
def test_cleanup_of_a_directory_without_a_record(driver, tmp_path):
    state_dir = tmp_path / new_id()
    (state_dir / "upper").mkdir(parents=True)
    driver.cleanup_state_dir(state_dir)
    assert not state_dir.exists()
    assert not rootfs.is_mounted(state_dir / "rootfs")


@pytest.mark.timeout(180)
def test_concurrent_creates_on_both_runtimes(config, busybox_image, tmp_path):
    """Parallel creates (the server runs several at once) race for loop devices and the /dsec cgroup parent."""
    from concurrent.futures import ThreadPoolExecutor

    drivers = [container_driver(name, config) for name in ("crun", "runc")]

    def cycle(i: int) -> str:
        driver = drivers[i % 2]
        sandbox_id = new_id()
        sb = driver.create(sandbox_id, SandboxSpec(), busybox_image, tmp_path / sandbox_id)
        try:
            return sh(sb, "hostname").strip()
        finally:
            driver.destroy(sb)

    with ThreadPoolExecutor(6) as pool:
        names = list(pool.map(cycle, range(12)))
    assert len(set(names)) == 12
    assert not [f for f in loop_backing_files() if f.startswith(str(tmp_path))]
    assert list(tmp_path.iterdir()) == []
