"""Root in a crun/runc sandbox is not root on the host: each sandbox runs in a user namespace whose ids 0..65535
are an unprivileged host range of its own (userns.py), the shared image layers and volumes shown in that range
through idmapped mounts (idmap.py). Judged on the host: /proc status lines, owners in the upper dir, leases."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from dsec.config import ServerConfig
from dsec.models import SandboxSpec, VolumeMount
from dsec.substrates.base import volume_source
from dsec.substrates.container import bundle, cgroups, userns
from dsec.substrates.container.driver import ContainerSandbox, container_driver

from .conftest import new_id, run, sh


def host_ids(pid: int) -> tuple[list[int], list[int]]:
    """(real, effective, saved, fs uids), (the same gids) of a host pid, from /proc/<pid>/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return [int(v) for v in fields["Uid"].split()], [int(v) for v in fields["Gid"].split()]


def sandbox_pids(sb: ContainerSandbox) -> list[int]:
    directory = cgroups.controller_dir("memory", sb.record.cgroups_path)
    assert directory is not None
    return [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]


@pytest.mark.timeout(180)
def test_root_inside_is_an_unprivileged_host_uid(make_sandbox):
    sb = make_sandbox()
    base = sb.record.host_base
    assert base is not None and base >= userns.HOST_BASE and base % userns.IDS == 0
    assert sh(sb, "id -u; id -g") == "0\n0\n"
    assert sh(sb, "cat /proc/self/uid_map").split() == ["0", str(base), str(userns.IDS)]
    assert sh(sb, "cat /proc/self/gid_map").split() == ["0", str(base), str(userns.IDS)]
    sleeper = sb.spawn(["sleep", "600"], {"PATH": "/bin"}, "/")
    pids = sandbox_pids(sb)
    assert len(pids) >= 2, "the agent and the sleeper"
    for pid in pids:
        uids, gids = host_ids(pid)
        assert uids == [base] * 4 and gids == [base] * 4, f"host pid {pid} runs as {uids}/{gids}, not {base}"
    sleeper.signal(9)


@pytest.mark.timeout(180)
def test_root_owns_its_files_inside_and_the_host_range_owns_them_outside(make_sandbox):
    sb = make_sandbox()
    base = sb.record.host_base
    assert base is not None
    sh(sb, "echo mine > /root/new; echo changed >> /etc/layer; mkdir -p /home/u && chown 1000:1001 /home/u")
    assert sh(sb, "stat -c '%u:%g' /root/new /etc/layer /home/u /bin/busybox") == "0:0\n0:0\n1000:1001\n0:0\n"
    upper = sb.upper_dir
    assert (os.stat(upper / "root/new").st_uid, os.stat(upper / "root/new").st_gid) == (base, base)
    assert os.stat(upper / "etc/layer").st_uid == base, "a copied-up image file belongs to the sandbox's range"
    assert (os.stat(upper / "home/u").st_uid, os.stat(upper / "home/u").st_gid) == (base + 1000, base + 1001)
    assert os.stat(sb.record.rootfs).st_uid == base, "the rootfs top is its root's"
    layer = sb.writable_layer()  # what image builds and snapshots read: the sandbox's own ids
    assert (os.stat(layer / "root/new").st_uid, os.stat(layer / "home/u").st_gid) == (0, 1001)


@pytest.mark.timeout(180)
def test_each_sandbox_gets_its_own_range_and_gives_it_back(driver, busybox_image, tmp_path):
    made = [driver.create(sid, SandboxSpec(), busybox_image, tmp_path / sid) for sid in (new_id(), new_id())]
    bases = [sb.record.host_base for sb in made]
    try:
        assert None not in bases and bases[0] != bases[1]
        leases = {os.readlink(userns.LEASES / str((b - userns.HOST_BASE) // userns.IDS)) for b in bases}
        assert leases == {str((tmp_path / sb.sandbox_id).resolve()) for sb in made}
        # the second sandbox's root cannot touch the first one's files (a breakout lands as another uid)
        _, err, exited = run(made[1], ["kill", "-0", "1"])
        assert exited.exit_code == 0, "its own pid 1 is fine"
    finally:
        for sb in made:
            driver.destroy(sb)
    for base in bases:
        assert not os.path.lexists(userns.LEASES / str((base - userns.HOST_BASE) // userns.IDS)), "lease released"


@pytest.mark.timeout(180)
def test_snapshot_stores_own_ids_and_restores_into_another_range(driver, make_sandbox, busybox_image, tmp_path):
    sb = make_sandbox()
    sh(sb, "echo data > /root/f; mkdir /srv && chown 1000:1000 /srv && echo x > /srv/g && chown 1000:1000 /srv/g;"
           "rm /etc/layer")  # fmt: skip
    snap = tmp_path / "snap"
    sb.snapshot(snap)
    with tarfile.open(snap / "upper.tar") as tar:
        owners = {m.name: (m.uid, m.gid) for m in tar.getmembers()}
    assert owners["./root/f"] == (0, 0) and owners["./srv/g"] == (1000, 1000), owners
    sandbox_id = new_id()
    restored = driver.restore(sandbox_id, SandboxSpec(), busybox_image, snap, tmp_path / sandbox_id)
    try:
        base = restored.record.host_base
        assert base is not None and base != sb.record.host_base
        script = "cat /root/f; stat -c '%u:%g' /root/f /srv/g; test -e /etc/layer || echo whiteout kept"
        assert sh(restored, script) == "data\n0:0\n1000:1000\nwhiteout kept\n"
        assert os.stat(restored.upper_dir / "srv/g").st_uid == base + 1000
        sh(restored, "echo more >> /srv/g")
    finally:
        driver.destroy(restored)


@pytest.mark.timeout(180)
def test_a_volume_keeps_one_set_of_owners_across_sandboxes_of_different_ranges(busybox_image, tmp_path):
    config = ServerConfig(home=tmp_path / "home")
    source = volume_source(config.volumes_dir, "shared")
    source.mkdir(parents=True)
    driver = container_driver("crun", config)
    spec = SandboxSpec(volumes=[VolumeMount(name="shared", mount_path="/data")])
    writer = driver.create(new_id(), spec, busybox_image, tmp_path / "w")
    try:
        sh(writer, "echo one > /data/f; mkdir /data/d; chown 1000 /data/d")
        views = list((tmp_path / "w" / "volumes").iterdir())
        assert len(views) == 1
    finally:
        driver.destroy(writer)
    assert not (tmp_path / "w").exists(), "the idmapped view was unmounted and the state dir removed"
    assert (os.stat(source / "f").st_uid, os.stat(source / "d").st_uid) == (0, 1000), "stored with in-sandbox ids"
    reader = driver.create(new_id(), spec, busybox_image, tmp_path / "r")
    try:
        assert sh(reader, "stat -c '%u' /data/f /data/d; echo two >> /data/f; cat /data/f") == "0\n1000\none\ntwo\n"
    finally:
        driver.destroy(reader)


def test_bundle_asks_for_a_user_namespace_and_a_sysfs_it_may_mount(busybox_image, tmp_path):
    config = bundle.runtime_config("sb-x", SandboxSpec(), busybox_image.config, tmp_path, tmp_path / "a", tmp_path,
                                   uid_base=userns.HOST_BASE)  # fmt: skip
    assert {"type": "user"} in config["linux"]["namespaces"]
    assert config["linux"]["uidMappings"] == [{"containerID": 0, "hostID": userns.HOST_BASE, "size": userns.IDS}]
    assert config["linux"]["gidMappings"] == config["linux"]["uidMappings"]
    joined = bundle.runtime_config("sb-x", SandboxSpec(), busybox_image.config, tmp_path, tmp_path / "a", tmp_path,
                                   netns=tmp_path / "ns", uid_base=userns.HOST_BASE)  # fmt: skip
    sys_mount = next(m for m in joined["mounts"] if m["destination"] == "/sys")
    assert sys_mount["type"] == "bind", "a netns prepared on the host belongs to the host's user namespace"
