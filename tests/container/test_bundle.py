"""config.json without a runtime: the parts both runtimes must receive (fast unit tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsec.errors import InvalidSpec
from dsec.models import Resources, SandboxSpec
from dsec.substrates.base import ImageConfig
from dsec.substrates.container import bundle, seccomp
from dsec.substrates.container.driver import container_driver


def config(**spec_fields) -> dict:
    spec = SandboxSpec(**spec_fields)
    image = ImageConfig(env=["PATH=/bin", "LANG=C", "KEEP=image"], workdir="/srv")
    return bundle.runtime_config("sb-1", spec, image, Path("/r"), Path("/agent"), Path("/run-dir"))


def test_agent_is_pid_1_with_its_socket_dir_bound():
    cfg = config()
    assert cfg["process"]["args"] == ["/.dsec/agent", "--listen", "/.dsec/run/agent.sock"]
    mounts = {m["destination"]: m for m in cfg["mounts"]}
    assert mounts["/.dsec/agent"]["source"] == "/agent" and "ro" in mounts["/.dsec/agent"]["options"]
    assert mounts["/.dsec/run"]["source"] == "/run-dir" and "rw" in mounts["/.dsec/run"]["options"]
    assert "/tmp" not in mounts, "/tmp stays on the writable layer so files persist like on a real machine"
    assert cfg["hostname"] == "sb-1"
    assert cfg["root"] == {"path": "/r", "readonly": False}


def test_env_merges_image_then_spec_and_workdir_falls_back_to_image():
    cfg = config(env={"LANG": "C.UTF-8", "NEW": "1"}, workdir="")
    env = cfg["process"]["env"]
    assert env == ["PATH=/bin", "LANG=C.UTF-8", "KEEP=image", "NEW=1"]
    assert cfg["process"]["cwd"] == "/srv"
    assert config(workdir="/work")["process"]["cwd"] == "/work"
    assert bundle.merge_env([], {})[0].startswith("PATH=/usr/local/sbin"), "an image without PATH gets Docker's"


def test_network_namespace_unless_network_is_opted_in():
    isolated = {ns["type"] for ns in config()["linux"]["namespaces"]}
    assert isolated == {"pid", "ipc", "uts", "mount", "network"}
    host = {ns["type"] for ns in config(network=True)["linux"]["namespaces"]}
    assert host == {"pid", "ipc", "uts", "mount"}


def test_limits_hardening_and_cgroup_parent():
    cfg = config(resources=Resources(cpu=1.5, memory_mb=300, pids=64))
    res = cfg["linux"]["resources"]
    assert res["memory"] == {"limit": 300 << 20, "swap": 300 << 20}, "swap limit = memory limit: no swap escape"
    assert res["pids"] == {"limit": 64}
    assert res["cpu"] == {"quota": 150_000, "period": 100_000}
    assert res["devices"][0] == {"allow": False, "access": "rwm"}
    assert cfg["linux"]["cgroupsPath"] == "/dsec/sb-1"
    process = cfg["process"]
    assert process["noNewPrivileges"] is True
    assert "CAP_NET_RAW" not in process["capabilities"]["bounding"]
    assert "CAP_SYS_ADMIN" not in process["capabilities"]["bounding"]
    assert process["rlimits"][0]["hard"] <= 20_000
    assert "/proc/kcore" in cfg["linux"]["maskedPaths"] and "/proc/sys" in cfg["linux"]["readonlyPaths"]


def test_seccomp_denies_escape_syscalls():
    profile = seccomp.default_profile()
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = {name for rule in profile["syscalls"] if not rule.get("args") for name in rule["names"]}
    for name in ("mount", "umount2", "ptrace", "kexec_load", "init_module", "reboot", "swapon", "pivot_root", "unshare", "bpf"):
        assert name in denied
    assert "execve" not in denied and "clone" not in denied


def test_unknown_runtime_is_a_typed_error():
    with pytest.raises(InvalidSpec):
        container_driver("kata")
