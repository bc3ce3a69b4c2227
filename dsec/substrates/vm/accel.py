"""Decide once per host whether KVM can really boot our guest, else use TCG.

Why a probe boot and not just `/dev/kvm exists`: on hosts with paravirtual KVM (PVM) the device is there but a
stock guest kernel hangs or dies with emulation failures. So we boot the real guest kernel + initramfs with
`-accel kvm` and the `dsec.probe` flag (the guest init prints a marker and powers off), with a deadline. The
answer is cached in `$DSEC_HOME/vm/accel.json`, keyed by host kernel and guest kernel, so it costs one boot per
host. `DSEC_VM_ACCEL=kvm|tcg` overrides it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
from pathlib import Path

from dsec.substrates.vm.config import VmConfig
from dsec.substrates.vm.guest import GuestKernel, base_initramfs, ensure_kernel

PROBE_MARKER = b"DSEC-PROBE-OK"
ACCELS = ("kvm", "tcg")
_lock = threading.Lock()


def _probe_kvm(cfg: VmConfig, kernel: GuestKernel) -> tuple[bool, str]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm"
    argv = [
        cfg.qemu, "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "256", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(base_initramfs(cfg, kernel)),
        "-append", f"{cfg.kernel_cmdline} dsec.probe",
    ]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=cfg.kvm_probe_timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, f"KVM probe boot did not finish within {cfg.kvm_probe_timeout_s:.0f}s"
    if PROBE_MARKER in proc.stdout:
        return True, "KVM probe boot reached the guest init"
    tail = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()[-1:]
    return False, f"KVM probe boot failed (exit {proc.returncode}): {' '.join(tail)}"


def host_accel(cfg: VmConfig) -> str:
    """'kvm' or 'tcg' for this host (probed once, then read from the cache)."""
    forced = os.environ.get("DSEC_VM_ACCEL", "")
    if forced in ACCELS:
        return forced
    with _lock:
        kernel = ensure_kernel(cfg)
        key = {"host_kernel": platform.release(), "guest_kernel": kernel.version}
        try:
            cached = json.loads(cfg.accel_cache.read_text())
            if {k: cached.get(k) for k in key} == key and cached.get("accel") in ACCELS:
                return cached["accel"]
        except (OSError, ValueError):
            pass
        works, reason = _probe_kvm(cfg, kernel)
        record = key | {"accel": "kvm" if works else "tcg", "reason": reason}
        cfg.root.mkdir(parents=True, exist_ok=True)
        tmp = cfg.accel_cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, cfg.accel_cache)
        return record["accel"]


def probe_record(cfg: VmConfig) -> dict:
    """The cached probe answer with its reason (for `dsec` diagnostics and the docs)."""
    host_accel(cfg)
    return json.loads(Path(cfg.accel_cache).read_text())
