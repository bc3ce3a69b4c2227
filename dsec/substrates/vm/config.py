"""Settings and on-disk layout of the VM substrates, all under `$DSEC_HOME/vm/`.

Everything expensive (guest kernel, initramfs, per-image root disks, template snapshots, the KVM probe
answer) is cached here by content hash, so a second server start or a second sandbox reuses it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from dsec.config import ServerConfig


class VmConfig(BaseModel):
    """Tunables of the QEMU drivers; defaults fit a 2-core TCG host and work unchanged under KVM."""

    root: Path
    qemu: str = "qemu-system-x86_64"
    qemu_img: str = "qemu-img"
    kernel_package: str = Field("linux-image-cloud-amd64", description="Debian meta package naming the guest kernel")
    boot_timeout_s: float = Field(60.0, gt=0, description="cold boot until the agent answers (TCG is slow)")
    restore_timeout_s: float = Field(30.0, gt=0)
    kvm_probe_timeout_s: float = Field(15.0, gt=0)
    min_memory_mb: int = Field(128, ge=64, description="below this the cloud kernel + initramfs cannot boot")
    max_templates: int = Field(12, ge=1, description="saved templates kept (LRU); each holds a guest memory image")
    # init_on_free=1: freed guest pages are zero, and QEMU skips zero pages when saving, so a 256 MiB template's
    # state shrinks from 91 to 51 MB and a restored VM's RSS from 184 to 148 MB (measured).
    kernel_cmdline: str = (
        "console=ttyS0 loglevel=3 panic=-1 init_on_free=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
    )

    @classmethod
    def from_server(cls, config: ServerConfig) -> VmConfig:
        return cls(root=config.home / "vm")

    @property
    def guest_dir(self) -> Path:
        """Extracted kernel package + built initramfs archives."""
        return self.root / "guest"

    @property
    def disks_dir(self) -> Path:
        """One raw ext4 root disk per image digest."""
        return self.root / "disks"

    @property
    def templates_dir(self) -> Path:
        """One booted-and-saved template per (machine, image, memory, cpus, accel, guest)."""
        return self.root / "templates"

    @property
    def accel_cache(self) -> Path:
        return self.root / "accel.json"
