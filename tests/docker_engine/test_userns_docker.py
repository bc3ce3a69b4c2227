"""Root in a Docker-driver sandbox is not root on the host (issue #22): dsec's engine remaps every container into
one unprivileged host range (dockerd.py), judged on the host against the real engine and agent."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from dsec.models import Resources, SandboxSpec, VolumeMount
from dsec.substrates.base import volume_source
from dsec.substrates.container.dockerd import REMAP_BASE, REMAP_IDS, REMAP_USER, EngineConfig, ensure_engine, ping, stop_engine
from dsec.substrates.container.rootfs import is_mounted
from dsec.substrates.container.userns import HOST_BASE

from .conftest import run

pytestmark = pytest.mark.timeout(180)
NSENTER_TIMEOUT_S = 60


def spec(**kw) -> SandboxSpec:
    return SandboxSpec(image="test-busybox", **kw)


def _uids(pid: int) -> list[int]:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
    return [int(v) for v in line.split()[1:]]


def _host_pids(driver, container: str) -> list[int]:
    top = driver.api.top(container)
    column = top["Titles"].index("PID")
    return [int(row[column]) for row in top["Processes"]]


def _upper(driver, container: str) -> Path:
    return Path(driver.api.inspect_container(container)["GraphDriver"]["Data"]["UpperDir"])


def test_the_range_is_unprivileged_and_overlaps_no_crun_runc_slot(driver):
    assert driver.host_base == REMAP_BASE
    assert 65536 <= REMAP_BASE and REMAP_BASE + REMAP_IDS <= HOST_BASE
    for name in ("/etc/subuid", "/etc/subgid"):
        assert f"{REMAP_USER}:{REMAP_BASE}:{REMAP_IDS}" in Path(name).read_text().splitlines()


def test_root_inside_runs_as_the_mapped_uid_on_the_host(make_sandbox, driver):
    sb = make_sandbox(spec())
    inside = run(sb, ["sh", "-c", "id -u; id -g; cat /proc/self/uid_map; sleep 60 & echo started"])[0].split()
    assert inside[:2] == [b"0", b"0"]
    assert inside[2:5] == [b"0", str(REMAP_BASE).encode(), str(REMAP_IDS).encode()]
    pids = _host_pids(driver, sb.container)
    assert driver.api.inspect_container(sb.container)["State"]["Pid"] in pids and len(pids) >= 2
    assert {uid for pid in pids for uid in _uids(pid)} == {REMAP_BASE}, "every process of the container, every uid"


def test_files_the_sandbox_writes_are_the_range_on_its_disk(make_sandbox, driver):
    sb = make_sandbox(spec(resources=Resources(disk_mb=64)))
    sb.write_file("/work/api.txt", [b"via the files API\n"])
    run(sb, ["sh", "-c", "echo x > /root/exec.txt && chown 1000:1001 /root/exec.txt"])
    listing = run(sb, ["ls", "-ln", "/work/api.txt", "/root/exec.txt"])[0].decode().splitlines()
    owners = sorted((line.split()[2], line.split()[3]) for line in listing)
    assert owners == [("0", "0"), ("1000", "1001")], listing
    upper = _upper(driver, sb.container)
    api, exec_file = os.stat(upper / "work" / "api.txt"), os.stat(upper / "root" / "exec.txt")
    assert (api.st_uid, api.st_gid) == (REMAP_BASE, REMAP_BASE)
    assert (exec_file.st_uid, exec_file.st_gid) == (REMAP_BASE + 1000, REMAP_BASE + 1001)
    assert os.stat(upper).st_uid == REMAP_BASE, "the container's / belongs to its root"
    state_dir = Path(driver.api.inspect_container(sb.container)["Config"]["Labels"]["dsec.state_dir"])
    assert is_mounted(upper.parent), "the writable layer is on the sandbox's own disk"
    assert os.stat(state_dir / "agent-run").st_uid == REMAP_BASE, "the agent (root inside) binds its socket there"


def test_a_breakout_with_a_leaked_host_root_fd_reads_no_root_file(make_sandbox, driver, tmp_path):
    """nsenter into the container's user namespace (every capability there) on the host's filesystem, holding a
    descriptor of the host's / (the shape of runc's CVE-2024-21626): root-only files stay closed."""
    secret = secrets.token_hex(8)
    bait = Path("/tmp") / f"dsec-docker-bait-{secrets.token_hex(4)}"
    public = Path("/tmp") / f"dsec-docker-public-{secrets.token_hex(4)}"
    target = Path("/etc") / f"dsec-docker-{secrets.token_hex(4)}"
    bait.write_text(secret)
    bait.chmod(0o600)
    public.write_text("public\n")
    public.chmod(0o644)
    sb = make_sandbox(spec())
    pid = driver.api.inspect_container(sb.container)["State"]["Pid"]
    host_root = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = f"/proc/self/fd/{host_root}"
        script = f"id -u; cat {fd}{bait} 2>&1; cat {fd}{public}; echo pwned > {fd}{target} 2>&1; echo done"
        proc = subprocess.run(
            ["nsenter", f"--target={pid}", "--user", "--", "/bin/sh", "-c", script],
            capture_output=True, pass_fds=(host_root,), timeout=NSENTER_TIMEOUT_S, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        os.close(host_root)
        bait.unlink()
        public.unlink()
    wrote = target.exists()
    target.unlink(missing_ok=True)
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    lines = proc.stdout.decode(errors="replace").splitlines()
    assert lines[0] == "0" and "public" in lines and lines[-1] == "done", out
    assert secret not in out and out.count("Permission denied") == 2, out
    assert not wrote


def test_snapshots_hold_the_sandbox_own_ids_and_restore_into_the_range(make_sandbox, driver, busybox_image, tmp_path):
    sb = make_sandbox(spec())
    run(sb, ["sh", "-c", "echo a > /root/a && mkdir -p /home/u && echo b > /home/u/b && chown -R 1000:1001 /home/u"])
    snap = tmp_path / "snap"
    assert sb.snapshot(snap) == "filesystem"
    with tarfile.open(snap / "docker-upper.tar") as tar:
        owners = {m.name.lstrip("./"): (m.uid, m.gid) for m in tar.getmembers()}
    assert owners["root/a"] == (0, 0) and owners["home/u/b"] == (1000, 1001), "archives hold in-sandbox ids"
    state = tmp_path / "restored"
    state.mkdir()
    restored = driver.restore(f"r{secrets.token_hex(5)}", spec(), busybox_image, snap, state)
    try:
        assert run(restored, ["stat", "-c", "%u:%g", "/root/a", "/home/u/b"])[0].split() == [b"0:0", b"1000:1001"]
        upper = _upper(driver, restored.container)
        assert os.stat(upper / "home" / "u" / "b").st_uid == REMAP_BASE + 1000
        assert not list(state.glob("view-*")), "the idmapped view is gone"
    finally:
        driver.destroy(restored)
    assert not list(snap.parent.glob("snap/view-*")) and not list((tmp_path).rglob("view-*"))


def test_volumes_keep_in_sandbox_ids_on_disk(make_sandbox, driver):
    name = f"uv{secrets.token_hex(4)}"
    source = volume_source(driver.volumes_dir, name)
    source.mkdir(parents=True)
    try:
        (source / "by-root").write_text("r\n")
        (source / "by-user").write_text("u\n")
        os.chown(source / "by-user", 1000, 1001)
        sb = make_sandbox(spec(volumes=[VolumeMount(name=name, mount_path="/data")]))
        listing = run(sb, ["ls", "-ln", "/data"])[0].decode()
        assert " 0 " in next(x for x in listing.splitlines() if x.endswith("by-root"))
        assert " 1000 " in next(x for x in listing.splitlines() if x.endswith("by-user"))
        assert run(sb, ["sh", "-c", "echo new > /data/new"])[2].exit_code == 0
        assert os.stat(source / "new").st_uid == 0, "a volume keeps in-sandbox ids: any sandbox reads it alike"
        state_dir = Path(driver.api.inspect_container(sb.container)["Config"]["Labels"]["dsec.state_dir"])
        driver.destroy(sb)
        assert not (state_dir / "volumes" / "0").is_mount(), "the idmapped view is unmounted at destroy"
    finally:
        shutil.rmtree(source.parent)


def test_an_engine_started_without_the_remap_is_restarted_with_it(tmp_path):
    """A second engine on its own socket and data root (the shared one stays untouched)."""
    tag = secrets.token_hex(3)
    cfg = EngineConfig(
        socket=Path(f"/run/dsec-docker-t{tag}.sock"), data_root=tmp_path / "data", exec_root=Path(f"/run/dsec-docker-t{tag}"),
        pidfile=Path(f"/run/dsec-docker-t{tag}.pid"), log_file=tmp_path / "dockerd.log", userns_remap=False,
    )  # fmt: skip
    try:
        url = ensure_engine(cfg=cfg)
        first_pid = int(cfg.pidfile.read_text())
        assert not (cfg.data_root / f"{REMAP_BASE}.{REMAP_BASE}").exists()
        assert ensure_engine(cfg=cfg) == url and int(cfg.pidfile.read_text()) == first_pid, "reused as it is"
        remapped = cfg.model_copy(update={"userns_remap": True})
        assert ensure_engine(cfg=remapped) == url and ping(url)
        assert int(cfg.pidfile.read_text()) != first_pid and not Path(f"/proc/{first_pid}").exists()
        assert (cfg.data_root / f"{REMAP_BASE}.{REMAP_BASE}").is_dir(), "its store is now the remapped one"
    finally:
        try:
            if cfg.pidfile.exists():
                stop_engine(cfg)
        finally:
            shutil.rmtree(cfg.exec_root, ignore_errors=True)
            cfg.socket.unlink(missing_ok=True)

