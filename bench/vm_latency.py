"""VM latency: cold boot against template restore, exec round trip, accelerator and memory of one microVM.

Measured at the driver (dsec.substrates.vm), on a busybox image (the store's `busybox` when it is there, else a
one-layer rootfs of the host's busybox-static), 256 MiB / 1 vCPU:
  microvm_cold_boot_s   QEMU start → guest kernel → initramfs → root mount → agent answers a ping (median)
  microvm_restore_s     QEMU start with -incoming on the template snapshot → agent answers a ping (median)
  restore_speedup       cold boot / restore (target ≥ 5)
  vm_exec_roundtrip_ms  spawn `true` in a restored microVM and wait for its exit, over virtio-serial (median)
  q35_restore_s         the same restore on the q35 full VM
  accel                 kvm or tcg, from the one-time probe boot
  vm_rss_mb             resident memory of one restored microVM's QEMU after a few execs
Cold boots and restores run interleaved so machine load hits both alike. The last line is key=value pairs.

Usage: .venv/bin/python -m bench.vm_latency [--n 5] [--exec-n 50]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from dsec.config import ServerConfig
from dsec.errors import DsecError
from dsec.models import SandboxSpec
from dsec.substrates.base import ImageConfig, ImageRootfs
from dsec.substrates.vm import vm_driver
from dsec.substrates.vm.disk import image_disk
from dsec.substrates.vm.driver import QemuDriver, VmSandbox
from dsec.substrates.vm.template import cold_boot, ensure_template

from bench.harness import report

MEMORY_MB = 256


def busybox_image(work: Path, config: ServerConfig) -> ImageRootfs:
    try:
        from dsec.images.store import LayerStore

        return LayerStore(config.images_dir).resolve("busybox")
    except (ImportError, DsecError):
        root = work / "rootfs"
        (root / "bin").mkdir(parents=True)
        shutil.copy("/bin/busybox", root / "bin" / "busybox")
        subprocess.run(["chroot", str(root), "/bin/busybox", "--install", "-s", "/bin"], check=True)
        digest = hashlib.sha256(Path("/bin/busybox").read_bytes() + b"dsec-vm-bench-1").hexdigest()
        return ImageRootfs("bench-busybox", f"sha256:{digest}", [root], ImageConfig(env=["PATH=/bin"]))


def exec_true(sandbox: VmSandbox) -> float:
    started = time.perf_counter()
    for _ in sandbox.spawn(["true"], {"PATH": "/bin:/usr/bin"}, "/").events():
        pass
    return time.perf_counter() - started


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5, help="cold boots and restores each")
    parser.add_argument("--exec-n", type=int, default=50)
    args = parser.parse_args()
    config = ServerConfig()
    microvm = vm_driver("microvm", config)
    q35 = vm_driver("vm", config)
    assert isinstance(microvm, QemuDriver) and isinstance(q35, QemuDriver)
    with tempfile.TemporaryDirectory(prefix="dsec-vm-bench-") as tmp:
        work = Path(tmp)
        image = busybox_image(work, config)
        spec = SandboxSpec(substrate="microvm", resources={"memory_mb": MEMORY_MB})
        machine = microvm.machine_for(spec)
        base = image_disk(image, microvm.cfg.disks_dir, spec.resources.disk_mb)
        ensure_template(microvm.cfg, machine, base)
        cold: list[float] = []
        restore: list[float] = []
        for i in range(args.n):
            state_dir = work / f"cold{i}"
            state_dir.mkdir()
            started = time.monotonic()
            process, client = cold_boot(microvm.cfg, machine, state_dir, base, f"bench-cold{i}")
            cold.append(time.monotonic() - started)
            client.close()
            process.kill()
            sandbox = microvm.create(f"bench-restore{i}", spec, image, work / f"restore{i}")
            restore.append(sandbox.start_s)
            microvm.destroy(sandbox)

        sandbox = microvm.create("bench-exec", spec, image, work / "exec")
        try:
            exec_true(sandbox)
            exec_ms = statistics.median(exec_true(sandbox) for _ in range(args.exec_n)) * 1000
            rss = rss_mb(sandbox.process.proc.pid)
            accel = sandbox.accel
        finally:
            microvm.destroy(sandbox)

        q35_spec = SandboxSpec(substrate="vm", resources={"memory_mb": MEMORY_MB})
        q35_restore: list[float] = []
        for i in range(max(2, args.n // 2)):
            sandbox = q35.create(f"bench-q35-{i}", q35_spec, image, work / f"q35-{i}")
            q35_restore.append(sandbox.start_s)
            q35.destroy(sandbox)

    cold_s = statistics.median(cold)
    restore_s = statistics.median(restore)
    print(f"cold boots (s): {' '.join(f'{x:.2f}' for x in cold)}")
    print(f"restores (s):   {' '.join(f'{x:.2f}' for x in restore)}")
    print(f"q35 restores (s): {' '.join(f'{x:.2f}' for x in q35_restore)}")
    report({"microvm_cold_boot_s": f"{cold_s:.2f}", "microvm_restore_s": f"{restore_s:.3f}",
            "restore_speedup": f"{cold_s / restore_s:.1f}", "vm_exec_roundtrip_ms": f"{exec_ms:.1f}",
            "q35_restore_s": f"{statistics.median(q35_restore):.3f}", "accel": accel, "vm_rss_mb": f"{rss:.0f}"})


if __name__ == "__main__":
    main()
