"""Registers the container substrate: OCI bundles run by crun or runc, or containers of dsec's Docker Engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dsec.substrates import registry

if TYPE_CHECKING:
    from dsec.config import ServerConfig
    from dsec.substrates.base import SandboxDriver


def _driver(name: str, config: ServerConfig, drivers: registry.DriverSource) -> SandboxDriver:
    if name == "docker":
        from dsec.substrates.container.docker_driver import DockerDriver

        return DockerDriver(config)
    from dsec.substrates.container.driver import container_driver

    return container_driver(name, config)


def sweepers() -> Sequence[registry.Sweeper]:
    """What any container sandbox (and so a function sandbox) can leave on a host: processes, cgroups, network
    plumbing, its disk's loop device."""
    from dsec.substrates.container import sweep

    return sweep.DOCKER, sweep.CGROUPS, sweep.NETWORK, sweep.DISKS, sweep.SPARE_DISKS, sweep.VOLATILE_HOMES


CONTAINER = registry.register(registry.Substrate(
    name="container",
    drivers={"crun": "crun", "runc": "runc", "docker": "docker"},
    default_driver=lambda config: config.container_driver,
    factory=_driver,
    capabilities=frozenset({registry.PAUSE, registry.SNAPSHOT, registry.ADOPT, registry.PORTS, registry.VOLUMES}),
    sweepers=sweepers,
    description="Linux containers: crun or runc (OCI bundles on an overlay of image layers) or Docker",
))  # fmt: skip
