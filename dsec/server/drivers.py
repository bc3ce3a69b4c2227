"""The server's drivers: built once each, on first use, from the substrate registry (dsec/substrates/registry.py)."""

from __future__ import annotations

import threading

from dsec.config import ServerConfig
from dsec.models import SandboxSpec
from dsec.substrates import registry
from dsec.substrates.base import SandboxDriver


class DriverRegistry:
    """Creates each driver once, lazily, so a server without Docker or QEMU still serves containers."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._drivers: dict[str, SandboxDriver] = {}
        self._lock = threading.RLock()  # re-entered: a function driver builds its container driver

    def name_for(self, spec: SandboxSpec) -> str:
        """The driver a spec selects (its substrate's default when `spec.driver` is empty); InvalidSpec if none."""
        return registry.get(spec.substrate).driver_for(spec.driver, self._config)

    def get(self, name: str) -> SandboxDriver:
        with self._lock:
            driver = self._drivers.get(name)
            if driver is None:
                driver = registry.owner_of(name).factory(name, self._config, self)
                self._drivers[name] = driver
            return driver
