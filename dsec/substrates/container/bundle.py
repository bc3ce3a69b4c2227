"""The OCI runtime bundle (config.json) of one sandbox, accepted by both crun and runc.

The container's PID 1 is the dsec agent, bind-mounted read-only from the host, listening on a unix socket in a
host directory bind-mounted at /.dsec/run: the host talks to it without exec-ing the runtime per command.
Hardening mirrors Docker's defaults (so software that runs under Docker runs here) and is a little stricter:
no-new-privileges, no raw sockets, a seccomp deny-list, Docker's masked and read-only /proc paths, and cgroup
limits on memory (swap included), pids and CPU.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

from dsec.models import SandboxSpec
from dsec.errors import Unsupported
from dsec.substrates.base import ImageConfig, volume_source
from dsec.substrates.container.seccomp import default_profile
from dsec.substrates.container.userns import oci_mappings

AGENT_PATH = "/.dsec/agent"
AGENT_RUN_DIR = "/.dsec/run"
AGENT_SOCKET = "agent.sock"
CGROUP_PARENT = "dsec"
CPU_PERIOD_US = 100_000
MAX_NOFILE = 20_000  # HOST.md: without CAP_SYS_RESOURCE an rlimit cannot exceed the host's hard limit
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Docker's default capability set minus NET_RAW (packet spoofing), MKNOD (the device cgroup denies new devices
# anyway), AUDIT_WRITE and SETFCAP (file capabilities are a way back to privileges): the Docker driver drops
# the same ones, so both container drivers grant identical powers.
CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
]

MASKED_PATHS = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

# (type, major, minor) of the devices a process may open: the standard set every runtime creates in /dev.
ALLOWED_DEVICES = [
    ("c", 1, 3),  # null
    ("c", 1, 5),  # zero
    ("c", 1, 7),  # full
    ("c", 1, 8),  # random
    ("c", 1, 9),  # urandom
    ("c", 5, 0),  # tty
    ("c", 5, 2),  # ptmx
    ("c", 136, None),  # pts/*
]

# What crun bind-mounts from the host into a user namespace's /dev (it cannot mknod there). Listed in its
# config.json too, because crun tells CRIU only about config.json's bind mounts as external ones: a device bound
# by crun alone fails a checkpoint ("./dev/urandom doesn't have a proper root mount"). Not for runc: it lists
# them for CRIU itself, and opening the bound /dev/tty to create its own fails ("no such device or address").
USERNS_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/tty", "/dev/random", "/dev/urandom")


def cgroups_path(sandbox_id: str) -> str:
    """The sandbox's cgroup, relative to every controller's root: all dsec sandboxes live under /dsec."""
    return f"/{CGROUP_PARENT}/{sandbox_id}"


def merge_env(image_env: list[str], spec_env: dict[str, str]) -> list[str]:
    """Image env, then the spec's on top (same name replaces); PATH defaults like Docker's when the image has none."""
    merged: dict[str, str] = {}
    for item in image_env:
        key, _, value = item.partition("=")
        if key:
            merged[key] = value
    merged.update(spec_env)
    merged.setdefault("PATH", DEFAULT_PATH.partition("=")[2])
    return [f"{key}={value}" for key, value in merged.items()]


def _nofile() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_NOFILE if hard == resource.RLIM_INFINITY else min(MAX_NOFILE, hard)


def _mounts(
    agent_binary: Path, agent_run_dir: Path, network: bool, own_sysfs: bool, hosts_file: Path | None = None
) -> list[dict]:
    """`own_sysfs`: the sandbox may mount a sysfs of its own (its network namespace belongs to it)."""
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
    ]
    if own_sysfs:
        mounts.append({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]})
    else:
        # sysfs can only be mounted fresh inside a network namespace of our own; share the host's, read-only
        mounts.append({"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]})
    if network and HOST_RESOLV_CONF.exists():  # on the host network, resolve names like the host does (as Docker)
        mounts.append({
            "destination": "/etc/resolv.conf", "type": "bind", "source": os.path.realpath(HOST_RESOLV_CONF),
            "options": ["bind", "ro", "nosuid", "nodev", "noexec"],
        })
    if hosts_file is not None:  # an allowlist's names, resolved on the host: the sandbox has no DNS
        mounts.append({"destination": "/etc/hosts", "type": "bind", "source": str(hosts_file), "options": ["bind", "ro", "nosuid", "nodev", "noexec"]})
    mounts += [
        {"destination": AGENT_PATH, "type": "bind", "source": str(agent_binary), "options": ["bind", "ro", "nosuid", "nodev"]},
        {"destination": AGENT_RUN_DIR, "type": "bind", "source": str(agent_run_dir), "options": ["bind", "rw", "nosuid", "nodev", "noexec"]},
    ]
    return mounts


def _volume_mounts(spec: SandboxSpec, volumes_dir: Path | None, sources: dict[str, Path] | None) -> list[dict]:
    """Bind each named volume the server has mounted on the host (it holds it for this sandbox) into the rootfs;
    `sources` names an idmapped view of a volume to bind instead (a user-namespaced sandbox, see idmap.py)."""
    if not spec.volumes:
        return []
    if volumes_dir is None:
        raise Unsupported("named volumes need the server's volume store; this driver was built without one")
    sources = sources or {}
    return [
        {"destination": v.mount_path, "type": "bind", "source": str(sources.get(v.name) or volume_source(volumes_dir, v.name)),
         "options": ["rbind", "ro" if v.read_only else "rw", "nosuid", "nodev"]}
        for v in spec.volumes
    ]


def _resources(spec: SandboxSpec) -> dict:
    memory = spec.resources.memory_mb << 20
    devices: list[dict] = [{"allow": False, "access": "rwm"}]
    for kind, major, minor in ALLOWED_DEVICES:
        rule: dict = {"allow": True, "type": kind, "major": major, "access": "rwm"}
        if minor is not None:
            rule["minor"] = minor
        devices.append(rule)
    return {
        "devices": devices,
        # swap = memory: the memsw limit equals the memory limit, so a sandbox cannot spill into swap
        "memory": {"limit": memory, "swap": memory},
        "pids": {"limit": spec.resources.pids},
        "cpu": {"quota": max(1000, int(spec.resources.cpu * CPU_PERIOD_US)), "period": CPU_PERIOD_US},
    }


def runtime_config(
    sandbox_id: str,
    spec: SandboxSpec,
    image: ImageConfig,
    rootfs: Path,
    agent_binary: Path,
    agent_run_dir: Path,
    netns: Path | None = None,
    hosts_file: Path | None = None,
    volumes_dir: Path | None = None,
    uid_base: int | None = None,
    volume_sources: dict[str, Path] | None = None,
    bind_devices: bool = False,
) -> dict:
    """The config.json of a sandbox whose PID 1 is the agent (see module docstring for the why of each part).

    `netns`: join this prepared network namespace (an egress allowlist's, see network.py) instead of a new one.
    `uid_base`: run in a user namespace whose ids 0..65535 are host ids from `uid_base` (userns.py); the rootfs,
    the agent's run dir and `volume_sources` must then already show their files in that range (idmap.py).
    `bind_devices` (crun, in a user namespace): list the host devices it binds into /dev (USERNS_DEVICES).
    """
    namespaces = [{"type": ns} for ns in ("pid", "ipc", "uts", "mount")]
    if not spec.network:
        namespaces.append({"type": "network", "path": str(netns)} if netns is not None else {"type": "network"})
    if uid_base is not None:
        namespaces.append({"type": "user"})
    # a fresh sysfs needs a network namespace the sandbox owns: a new one, and with a user namespace not one
    # prepared on the host (that one belongs to the host's user namespace)
    own_sysfs = not spec.network and (netns is None or uid_base is None)
    nofile = _nofile()
    config = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": [AGENT_PATH, "--listen", f"{AGENT_RUN_DIR}/{AGENT_SOCKET}"],
            "env": merge_env(image.env, spec.env),
            "cwd": spec.workdir or image.workdir or "/",
            "capabilities": {key: list(CAPABILITIES) for key in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": sandbox_id,
        "mounts": _mounts(agent_binary, agent_run_dir, spec.network, own_sysfs, hosts_file)
        + _volume_mounts(spec, volumes_dir, volume_sources),
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": cgroups_path(sandbox_id),
            "resources": _resources(spec),
            "seccomp": default_profile(),
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
            "rootfsPropagation": "private",
        },
    }
    if uid_base is not None:
        config["linux"].update(oci_mappings(uid_base))
    if uid_base is not None and bind_devices:
        config["mounts"] += [
            {"destination": dev, "type": "bind", "source": dev, "options": ["bind", "nosuid", "noexec"]}
            for dev in USERNS_DEVICES
        ]
    return config


def write_bundle(bundle_dir: Path, config: dict) -> Path:
    """Write config.json into `bundle_dir` (created if needed); returns the bundle dir for `--bundle`."""
    bundle_dir.mkdir(parents=True, exist_ok=True)
    tmp = bundle_dir / "config.json.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:  # its env may hold secrets
        fh.write(json.dumps(config))
    os.replace(tmp, bundle_dir / "config.json")
    return bundle_dir
