"""A throwaway substrate in one file, registered with no edit anywhere else (tests/core/test_substrate_plugin.py).

`relabel` runs sandboxes on the container substrate's crun driver under a substrate and a driver name of its own:
the smallest real substrate, proving the recipe in docs/ARCHITECTURE.md ("Adding a substrate"). Loaded by naming
this file in $DSEC_SUBSTRATE_MODULES (the SDK process and the embedded server both read it).
"""

from __future__ import annotations

from pathlib import Path

from dsec.config import ServerConfig
from dsec.models import SandboxSpec
from dsec.substrates import registry
from dsec.substrates.base import DriverSandbox, ImageRootfs, SandboxDriver

NAME = "relabel"
DRIVER = "relabel-crun"


class RelabelDriver(SandboxDriver):
    """Every sandbox is a crun container (the shared crun driver does the work); only the names are new."""

    name = DRIVER
    substrate = NAME

    def __init__(self, inner: SandboxDriver) -> None:
        self.inner = inner

    def create(self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, state_dir: Path) -> DriverSandbox:
        return self.inner.create(sandbox_id, spec, image, state_dir)

    def destroy(self, sandbox: DriverSandbox) -> None:
        self.inner.destroy(sandbox)

    def cleanup_state_dir(self, state_dir: Path) -> None:
        self.inner.cleanup_state_dir(state_dir)


def _driver(name: str, config: ServerConfig, drivers: registry.DriverSource) -> SandboxDriver:
    return RelabelDriver(drivers.get("crun"))


registry.register(registry.Substrate(
    name=NAME,
    drivers={"crun": DRIVER},
    default_driver=lambda config: "crun",
    factory=_driver,
    sweepers=lambda: registry.get("container").sweepers(),  # it leaves what crun containers leave
    description="crun containers under another name (a test of the plug-in recipe)",
))  # fmt: skip
