"""Pick the driver for a sandbox spec: one place that knows which module implements which substrate."""

from __future__ import annotations

import threading

from dsec.config import ServerConfig
from dsec.errors import InvalidSpec
from dsec.models import SandboxSpec
from dsec.substrates.base import SandboxDriver

CONTAINER_DRIVERS = ("crun", "runc", "docker")
VM_DRIVERS = {"microvm": "qemu-microvm", "vm": "qemu-q35"}


class DriverRegistry:
    """Creates each driver once, lazily, so a server without Docker or QEMU still serves containers."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._drivers: dict[str, SandboxDriver] = {}
        self._lock = threading.RLock()  # re-entered: a function driver builds its container driver

    def name_for(self, spec: SandboxSpec) -> str:
        if spec.substrate in ("container", "function"):
            name = spec.driver or self._config.container_driver
            if name not in CONTAINER_DRIVERS:
                raise InvalidSpec(f"unknown container driver {name!r}; choose one of {', '.join(CONTAINER_DRIVERS)}")
            return f"function+{name}" if spec.substrate == "function" else name
        if spec.substrate in VM_DRIVERS:
            if spec.driver and spec.driver not in ("", VM_DRIVERS[spec.substrate], "kvm", "tcg"):
                raise InvalidSpec(f"unknown {spec.substrate} driver {spec.driver!r}")
            return VM_DRIVERS[spec.substrate]
        raise InvalidSpec(f"unknown substrate {spec.substrate!r}")

    def get(self, name: str) -> SandboxDriver:
        with self._lock:
            driver = self._drivers.get(name)
            if driver is None:
                driver = self._build(name)
                self._drivers[name] = driver
            return driver

    def _build(self, name: str) -> SandboxDriver:
        if name.startswith("function+"):
            from dsec.substrates.function.driver import FunctionDriver

            return FunctionDriver(self.get(name.split("+", 1)[1]), self._config)
        if name in ("crun", "runc"):
            from dsec.substrates.container.driver import container_driver

            return container_driver(name, self._config)
        if name == "docker":
            from dsec.substrates.container.docker_driver import DockerDriver

            return DockerDriver(self._config)
        if name in VM_DRIVERS.values():
            from dsec.substrates.vm import vm_driver

            substrate = next(s for s, n in VM_DRIVERS.items() if n == name)
            return vm_driver(substrate, self._config)
        raise InvalidSpec(f"unknown driver {name!r}")
