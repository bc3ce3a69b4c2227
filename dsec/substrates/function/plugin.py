"""Registers the function substrate: a container sandbox of any container driver plus a warm Python worker."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsec.substrates import registry
from dsec.substrates.container.plugin import CONTAINER

if TYPE_CHECKING:
    from dsec.config import ServerConfig
    from dsec.substrates.base import SandboxDriver

PREFIX = "function+"  # "function+crun": the driver name sandbox records and destroy intents keep


def _driver(name: str, config: ServerConfig, drivers: registry.DriverSource) -> SandboxDriver:
    """Wraps the container substrate's driver (built once, shared with container sandboxes)."""
    from dsec.substrates.function.driver import FunctionDriver

    return FunctionDriver(drivers.get(name.removeprefix(PREFIX)), config)


registry.register(registry.Substrate(
    name="function",
    drivers={choice: PREFIX + driver for choice, driver in CONTAINER.drivers.items()},
    default_driver=CONTAINER.default_driver,
    factory=_driver,
    capabilities=CONTAINER.capabilities | {registry.CALL},
    sweepers=CONTAINER.sweepers,  # its sandboxes are containers: they leave what containers leave
    description="Python callables (sb.call) run by a warm worker inside a container sandbox",
))  # fmt: skip
