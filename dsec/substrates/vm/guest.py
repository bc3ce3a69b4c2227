"""The guest side of a VM: Debian cloud kernel + an initramfs holding busybox, virtio modules, init and the agent.

The kernel comes from Debian (`apt-get download` + `dpkg-deb -x`) because no other registry is reachable and
its virtio drivers are modules, which the initramfs loads. The initramfs is two concatenated archives: a base
one (busybox, init, modules; built at setup) and a tiny one holding the current `dsec-agent` binary, so a
rebuilt agent never forces a kernel or module rebuild. Both are cached by content hash.

`python -m dsec.substrates.vm.prepare` builds everything ahead of time (infra/setup.d/70-vm.sh runs it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dsec.agent.build import agent_binary
from dsec.errors import RuntimeFailure
from dsec.substrates.vm.config import VmConfig
from dsec.substrates.vm.cpio import CpioEntry, char_device, cpio_archive, directory, regular

BUSYBOX = Path("/bin/busybox")
INIT_SCRIPT = Path(__file__).with_name("init.sh")
# Loaded in this order after their dependencies; virtio_mmio serves -M microvm, virtio_pci serves q35; virtio_net
# serves the NIC of allowlisted machines (it finds no device in the others).
GUEST_MODULES = ("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_console", "virtio_net")


@dataclass(frozen=True)
class GuestKernel:
    version: str
    vmlinuz: Path
    modules_dir: Path


def _run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeFailure(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}; "
            "the guest kernel comes from Debian: check that apt can reach deb.debian.org"
        )
    return proc.stdout


def _kernel_package(meta_package: str) -> str:
    """The versioned package a kernel meta package depends on (e.g. linux-image-6.1.0-56-cloud-amd64)."""
    for line in _run(["apt-cache", "depends", meta_package]).splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if match:
            return match.group(1)
    raise RuntimeFailure(f"{meta_package} names no linux-image package; run apt-get update")


def ensure_kernel(cfg: VmConfig) -> GuestKernel:
    """Download and unpack the guest kernel once; later calls read the recorded answer."""
    record = cfg.guest_dir / "kernel.json"
    if record.exists():
        data = json.loads(record.read_text())
        kernel = GuestKernel(data["version"], Path(data["vmlinuz"]), Path(data["modules_dir"]))
        if kernel.vmlinuz.exists() and kernel.modules_dir.is_dir():
            return kernel
    package = _kernel_package(cfg.kernel_package)
    version = package.removeprefix("linux-image-")
    cfg.guest_dir.mkdir(parents=True, exist_ok=True)
    dest = cfg.guest_dir / f"kernel-{version}"
    if not dest.exists():
        with tempfile.TemporaryDirectory(dir=cfg.guest_dir) as tmp:
            _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package], cwd=Path(tmp))
            (deb,) = Path(tmp).glob("*.deb")
            staging = Path(tmp) / "x"
            _run(["dpkg-deb", "-x", str(deb), str(staging)])
            os.replace(staging, dest)
    kernel = GuestKernel(version, dest / "boot" / f"vmlinuz-{version}", dest / "lib" / "modules" / version)
    tmp_record = record.with_suffix(".tmp")
    tmp_record.write_text(json.dumps({"version": version, "vmlinuz": str(kernel.vmlinuz), "modules_dir": str(kernel.modules_dir)}))
    os.replace(tmp_record, record)
    return kernel


def _module_index(modules_dir: Path) -> dict[str, Path]:
    return {path.name.removesuffix(".ko").replace("-", "_"): path for path in modules_dir.rglob("*.ko")}


def _depends(module: Path) -> list[str]:
    """Read `depends=` from the module's .modinfo section (there is no depmod/modinfo on the host)."""
    match = re.search(rb"depends=([^\0]*)\0", module.read_bytes())
    if not match or not match.group(1):
        return []
    return [name.decode().replace("-", "_") for name in match.group(1).split(b",")]


def module_load_order(modules_dir: Path, wanted: tuple[str, ...] = GUEST_MODULES) -> list[tuple[str, Path]]:
    """`wanted` plus their dependencies, every module after the ones it needs."""
    index = _module_index(modules_dir)
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            raise RuntimeFailure(f"guest kernel module {name} not found under {modules_dir}; rebuild the guest")
        for dep in _depends(index[name]):
            visit(dep)
        order.append((name, index[name]))

    for name in wanted:
        visit(name)
    return order


def base_initramfs(cfg: VmConfig, kernel: GuestKernel) -> Path:
    """Build (or reuse) the busybox + init + modules archive."""
    modules = module_load_order(kernel.modules_dir)
    entries: list[CpioEntry] = [directory(d) for d in ("bin", "dev", "proc", "sys", "tmp", "newroot", "modules")]
    entries.append(char_device("dev/console", 5, 1))
    entries.append(regular("bin/busybox", BUSYBOX.read_bytes(), 0o755))
    entries.append(regular("init", INIT_SCRIPT.read_bytes(), 0o755))
    entries.append(regular("modules.order", "".join(f"{name}\n" for name, _ in modules).encode()))
    entries.extend(regular(f"modules/{name}.ko", path.read_bytes()) for name, path in modules)
    archive = cpio_archive(entries)
    path = cfg.guest_dir / f"initramfs-base-{hashlib.sha256(archive).hexdigest()[:16]}.cpio.gz"
    if not path.exists():
        _atomic_write(path, archive)
    return path


def guest_initrd(cfg: VmConfig, kernel: GuestKernel, agent: Path) -> Path:
    """The boot initrd: base archive followed by an archive holding `agent` as /dsec-agent."""
    base = base_initramfs(cfg, kernel).read_bytes()
    data = base + cpio_archive([regular("dsec-agent", agent.read_bytes(), 0o755)])
    path = cfg.guest_dir / f"initrd-{hashlib.sha256(data).hexdigest()[:16]}.img"
    if not path.exists():
        _atomic_write(path, data)
        _prune_initrds(cfg.guest_dir, keep=path)
    return path


def _prune_initrds(guest_dir: Path, keep: Path, newest: int = 4) -> None:
    """Every agent rebuild makes a new initrd (~14 MB): keep the newest few (snapshots hold hard links to theirs)."""
    initrds = sorted(guest_dir.glob("initrd-*.img"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in initrds[newest:]:
        if old != keep:
            old.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class GuestBoot:
    """What QEMU needs to boot a guest: `-kernel`, `-initrd`."""

    kernel: GuestKernel
    initrd: Path


def guest_boot(cfg: VmConfig) -> GuestBoot:
    """Kernel + initrd with the current agent binary (compiled on first use by dsec.agent.build)."""
    kernel = ensure_kernel(cfg)
    return GuestBoot(kernel, guest_initrd(cfg, kernel, Path(agent_binary())))
