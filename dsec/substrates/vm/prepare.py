"""Prepare the VM substrate ahead of time: fetch the guest kernel, build the initramfs, probe KVM.

A module of its own because it ties together the guest build (`guest.py`) and the accelerator probe
(`accel.py`, which boots that guest); neither of those may import the other's caller.
Run `python -m dsec.substrates.vm.prepare` (infra/setup.d/70-vm.sh does, with --quiet).
"""

from __future__ import annotations

import argparse

from dsec.config import ServerConfig
from dsec.substrates.vm.accel import probe_record
from dsec.substrates.vm.config import VmConfig
from dsec.substrates.vm.guest import base_initramfs, ensure_kernel, guest_boot


def main() -> None:
    parser = argparse.ArgumentParser(description="fetch the guest kernel, build the VM initramfs, probe KVM")
    parser.add_argument("--kernel-only", action="store_true", help="skip the agent (base initramfs only)")
    parser.add_argument("--quiet", action="store_true", help="print nothing unless something fails")
    args = parser.parse_args()
    cfg = VmConfig.from_server(ServerConfig())
    kernel = ensure_kernel(cfg)
    base = base_initramfs(cfg, kernel)
    lines = [f"guest kernel {kernel.version}: {kernel.vmlinuz}", f"base initramfs: {base}"]
    if not args.kernel_only:
        lines.append(f"initrd: {guest_boot(cfg).initrd}")
        record = probe_record(cfg)
        lines.append(f"accelerator: {record['accel']} ({record['reason']})")
    if not args.quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
