"""Template snapshots: boot a machine once per (image, machine shape), save it, and start every sandbox from it.

Why: a cold boot under TCG costs seconds (kernel, module loading, root mount, agent start); restoring a saved
machine costs a fraction of that. A template is a directory `templates/<key>/` holding `state` (QEMU device +
memory state written by QMP `migrate`), `disk.qcow2` (the booted root overlay) and `meta.json`. The key hashes
everything the saved state depends on, including the identity (inode, mtime) of the base disk, so a rebuilt
image disk never meets a stale overlay. Templates are built under a file lock (one build per key) and
published by rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dsec.agent.client import AgentClient
from dsec.errors import DsecError, RuntimeFailure
from dsec.substrates.vm.config import VmConfig
from dsec.substrates.vm.disk import create_overlay
from dsec.substrates.vm.machine import DISK, MachineSpec, QemuProcess

STATE = "state"
META = "meta.json"


@dataclass(frozen=True)
class Template:
    directory: Path
    machine: MachineSpec
    boot_s: float  # how long the cold boot of this template took (until the agent answered)

    @property
    def state(self) -> Path:
        return self.directory / STATE

    @property
    def disk(self) -> Path:
        return self.directory / DISK


def template_key(machine: MachineSpec, base_disk: Path) -> str:
    st = base_disk.stat()
    identity = {"machine": machine.to_dict(), "disk": str(base_disk), "inode": st.st_ino, "mtime": st.st_mtime_ns}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def cold_boot(cfg: VmConfig, machine: MachineSpec, state_dir: Path, base_disk: Path, sandbox_id: str) -> tuple[QemuProcess, AgentClient]:
    """Boot a fresh machine on a new overlay of `base_disk` until its agent answers a ping."""
    create_overlay(base_disk, state_dir / DISK)
    process = QemuProcess(cfg.qemu, machine, state_dir, None, cfg.boot_timeout_s)
    client = AgentClient(process.agent_socket, sandbox_id=sandbox_id)
    try:
        client.ping(timeout=cfg.boot_timeout_s)
    except BaseException as exc:
        client.close()
        tail = process.log_tail()
        process.kill()
        if isinstance(exc, DsecError):
            raise RuntimeFailure(f"VM {sandbox_id} did not boot: {exc.message}; guest console: {tail}") from exc
        raise
    return process, client


def ensure_template(cfg: VmConfig, machine: MachineSpec, base_disk: Path) -> Template:
    """The template for `machine` on `base_disk`, booting and saving it on first use."""
    key = template_key(machine, base_disk)
    final = cfg.templates_dir / key
    cfg.templates_dir.mkdir(parents=True, exist_ok=True)
    if (final / META).exists():
        return _load(final, machine)
    with open(cfg.templates_dir / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / META).exists():
            return _load(final, machine)
        work = cfg.templates_dir / f".{key}.{os.getpid()}.build"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            started = time.monotonic()
            process, client = cold_boot(cfg, machine, work, base_disk, f"template-{key[:8]}")
            boot_s = time.monotonic() - started
            try:
                process.save(work / STATE, cfg.restore_timeout_s)
            finally:
                client.close()
                process.kill()
            for name in os.listdir(work):
                if name not in (STATE, DISK):
                    (work / name).unlink()
            (work / META).write_text(json.dumps({"machine": machine.to_dict(), "boot_s": boot_s, "base_disk": str(base_disk)}))
            os.replace(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    prune_templates(cfg)
    return _load(final, machine)


def prune_templates(cfg: VmConfig, keep: int | None = None, idle_s: float = 600.0) -> list[Path]:
    """Remove the least recently used templates beyond `keep` (each holds a memory image of ~100 MB).

    Why `idle_s`: a template used moments ago may be about to be read by a restore; only idle ones go.
    """
    keep = cfg.max_templates if keep is None else keep
    entries = []
    for directory in cfg.templates_dir.iterdir():
        if directory.is_dir() and not directory.name.startswith("."):
            with contextlib.suppress(OSError):
                entries.append(((directory / META).stat().st_mtime, directory))
    entries.sort(reverse=True)
    removed = []
    for used_at, directory in entries[keep:]:
        if time.time() - used_at > idle_s:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


def _load(directory: Path, machine: MachineSpec) -> Template:
    with contextlib.suppress(OSError):
        os.utime(directory / META)  # last use, for prune_templates
    with contextlib.suppress(OSError, ValueError):
        return Template(directory, machine, float(json.loads((directory / META).read_text()).get("boot_s", 0.0)))
    return Template(directory, machine, 0.0)
