"""Named volumes in a VM: each volume's ext4 image (dsec/server/volumes.py) is one more virtio-blk disk, mounted
by the guest init (init.sh) at its mount path before the agent starts.

Why disks and not a shared directory: a disk needs nothing in the guest but the virtio-blk and ext4 drivers the
root disk already loads, and the volume's size stays its quota. The server holds the volume for the VM without
mounting it on the host (two kernels writing one ext4 corrupt it). The guest finds each disk by its serial
(`dsec-vol<i>`), never by device name, which follows the transport's probe order. A read-write volume is mounted
`sync`: a VM is killed, not shut down, and what the guest wrote must be in the image when the next holder comes.
"""

from __future__ import annotations

from pathlib import Path

from dsec.models import VolumeMount
from dsec.substrates.base import volume_image

SERIAL_PREFIX = "dsec-vol"


def disk_entries(volumes: list[VolumeMount], volumes_dir: Path) -> tuple[str, ...]:
    """The machine's volume disks as `MachineSpec.volumes` records them: "ro:<image>" or "rw:<image>"."""
    return tuple(f"{'ro' if v.read_only else 'rw'}:{volume_image(volumes_dir, v.name)}" for v in volumes)


def guest_cmdline(volumes: list[VolumeMount]) -> str:
    """`dsec.vol=<i>,<ro|rw>,<mount path as hex>` per volume, for init.sh (hex: a path may hold any byte)."""
    return " ".join(f"dsec.vol={i},{'ro' if v.read_only else 'rw'},{v.mount_path.encode().hex()}"
                    for i, v in enumerate(volumes))


def qemu_args(entries: tuple[str, ...], transport: str) -> list[str]:
    """One raw drive (read-only where the mount is) and one virtio-blk device, with its serial, per volume."""
    args: list[str] = []
    for index, entry in enumerate(entries):
        mode, _, image = entry.partition(":")
        file = image.replace(",", ",,")  # QEMU's option syntax escapes a comma by doubling it
        args += [
            "-drive", f"id=vol{index},if=none,format=raw,file={file},readonly={'on' if mode == 'ro' else 'off'}",
            "-device", f"virtio-blk-{transport},drive=vol{index},serial={SERIAL_PREFIX}{index}",
        ]
    return args
