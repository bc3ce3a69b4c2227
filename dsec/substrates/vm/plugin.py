"""Registers the microvm (QEMU `-M microvm`) and vm (QEMU q35) substrates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dsec.substrates import registry

if TYPE_CHECKING:
    from dsec.config import ServerConfig
    from dsec.substrates.base import SandboxDriver

CAPABILITIES = frozenset({
    registry.PAUSE, registry.SNAPSHOT, registry.MEMORY_SNAPSHOT, registry.ADOPT, registry.VOLUMES, registry.VOLUME_DISKS,
})


def sweepers() -> Sequence[registry.Sweeper]:
    """QEMU processes, and the netns/veth/nftables plumbing an allowlisted VM shares with containers."""
    from dsec.substrates.container import sweep as container_sweep
    from dsec.substrates.vm import sweep

    return sweep.QEMU, container_sweep.NETWORK


def _register(substrate: str, driver: str, description: str) -> None:
    def factory(name: str, config: ServerConfig, drivers: registry.DriverSource) -> SandboxDriver:
        from dsec.substrates.vm import vm_driver

        return vm_driver(substrate, config)

    registry.register(registry.Substrate(
        name=substrate,
        # "kvm" / "tcg" ask for an accelerator: the driver checks it is the one this host has
        drivers={driver: driver, "kvm": driver, "tcg": driver},
        default_driver=lambda config: driver,
        factory=factory,
        capabilities=CAPABILITIES,
        sweepers=sweepers,
        description=description,
    ))  # fmt: skip


_register("microvm", "qemu-microvm", "QEMU -M microvm: guest kernel + initramfs, root disk from the image layers")
_register("vm", "qemu-q35", "QEMU q35: a full PC machine, same guest, disk scheme and snapshots as microvm")
