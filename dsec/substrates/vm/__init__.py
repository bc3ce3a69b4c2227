"""The microvm (QEMU `-M microvm`) and vm (QEMU q35) substrates: same guest agent, disk scheme and snapshots."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsec.errors import InvalidSpec

if TYPE_CHECKING:  # the package is imported to register it (plugin.py): nothing heavy until a driver is built
    from dsec.config import ServerConfig
    from dsec.substrates.base import SandboxDriver


def vm_driver(substrate: str, config: ServerConfig) -> SandboxDriver:
    """The QEMU driver of `substrate` ("microvm" → qemu-microvm, "vm" → qemu-q35)."""
    from dsec.substrates.vm.driver import MicroVmDriver, Q35Driver

    if substrate == "microvm":
        return MicroVmDriver(config)
    if substrate == "vm":
        return Q35Driver(config)
    raise InvalidSpec(f"no VM driver for substrate {substrate!r}; use 'microvm' or 'vm'")
