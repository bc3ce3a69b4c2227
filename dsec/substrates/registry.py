"""The substrate registry: the one list of substrates the server, the CLI, the models and the orphan sweep read.

Why: a substrate used to be one driver module plus edits in seven or eight others (driver if-chains, the
`Substrate` literal, CLI choices, the orphan sweep that knew every substrate's leftovers). Now each substrate
package registers itself once, in its `plugin.py`: its name, the drivers `SandboxSpec.driver` may name, a factory
that builds a driver by name, its capabilities, and the sweepers that find what its sandboxes leave on a host.

Discovery: the built-in plugins (`BUILTIN`) and every module named in `$DSEC_SUBSTRATE_MODULES` (comma-separated
dotted module names or paths to `.py` files) are imported the first time the registry is read; each calls
`register`. The variable travels to an embedded server's child process with the rest of the environment, so the
SDK process and the server agree on the list. Registration stores factories, never drivers: nothing heavy (the
Docker SDK, QEMU probing) is imported until a server builds a driver.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dsec import models
from dsec.errors import InvalidSpec

if TYPE_CHECKING:
    from dsec.config import ServerConfig
    from dsec.substrates.base import SandboxDriver

BUILTIN = ("dsec.substrates.container.plugin", "dsec.substrates.function.plugin", "dsec.substrates.vm.plugin")
MODULES_ENV = "DSEC_SUBSTRATE_MODULES"

# The server's sandbox id scheme (SandboxManager._new_id) and the ownership mark the orphan sweep relies on: only
# resources named for such an id are ever judged; a driver used without a server (tests' `ct-…`, image builds'
# `build-…`) names its own and is never touched. Sweepers match host resources against it.
SANDBOX_ID = re.compile(r"sb-[0-9a-f]{16}")

# Capabilities a substrate may declare. A driver still raises `Unsupported` for an ability it lacks; the set lets
# callers answer before reaching a sandbox (the Call RPC, docs) and says what a new substrate is expected to offer.
CALL = "call"  # DriverSandbox.call: run a pickled Python callable in a warm worker
PAUSE = "pause"  # DriverSandbox.pause/resume
SNAPSHOT = "snapshot"  # DriverSandbox.snapshot + SandboxDriver.restore (fork builds on both)
MEMORY_SNAPSHOT = "memory-snapshot"  # a snapshot holds running processes, not only files
ADOPT = "adopt"  # SandboxDriver.adopt: sandboxes outlive their server and are re-attached after a restart
PORTS = "ports"  # DriverSandbox.netns_path: the port service reaches ports inside from the host
VOLUMES = "volumes"  # named volumes mount into its sandboxes
VOLUME_DISKS = "volume-disks"  # ... as block devices (a VM's virtio disks): the host must not mount them meanwhile
CAPABILITIES = frozenset({CALL, PAUSE, SNAPSHOT, MEMORY_SNAPSHOT, ADOPT, PORTS, VOLUMES, VOLUME_DISKS})


class DriverSource(Protocol):
    """Where a factory gets other drivers it wraps (the server's `DriverRegistry`): the function substrate's
    factory asks for the container driver it runs in, which is then shared with container sandboxes."""

    def get(self, name: str) -> SandboxDriver: ...


DriverFactory = Callable[[str, "ServerConfig", DriverSource], "SandboxDriver"]


class SweepContext(Protocol):
    """What a sweeper gets from the orphan sweep (dsec/server/orphans.py), which alone decides ownership."""

    def gone(self, sandbox_id: str, expected: Path | None = None) -> bool:
        """Whether `sandbox_id`'s resources are an orphan's (dead owner, or a server's id with no registration).
        `expected`: the state directory the resource itself names (a loop device's backing file, a pidfile)."""

    def dead_dir(self, sandbox_id: str) -> Path | None:
        """The dead owner's state directory of an id `gone` judged an orphan's; None when not known."""

    def remove(self, sandbox_id: str, kind: str, item: object, action: Callable[[], None]) -> bool:
        """Run one removal; on success record `item` under `kind`, on failure record it and keep the id registered
        so the next start retries. Never raises: one failure skips only this resource."""

    def record(self, kind: str, item: object) -> None:
        """Record something removed without an action of its own (released with another)."""

    def clean_state(self, sandbox_id: str, state_dir: Path) -> None:
        """Remove a dead sandbox's state directory (mounts below it first) and every sweeper's per-id state."""


class Sweeper(abc.ABC):
    """Finds and removes one kind of leftover on the host. Sweepers of every substrate run in `stage` order
    (lower first: processes before the network plumbing and disks they hold), each once however many
    substrates list it."""

    stage: int = 0  # 0 processes, 10 cgroups, 20 network plumbing, 30 disks, 40 what a whole home leaves
    kinds: tuple[str, ...] = ()  # what it reports (`Orphans.<kind>`), e.g. ("cgroups",)

    @abc.abstractmethod
    def sweep(self, ctx: SweepContext) -> None:
        """Remove (through `ctx.remove`) every leftover of this kind whose sandbox `ctx.gone` judges an orphan's."""

    def clean_state(self, sandbox_id: str, state_dir: Path) -> None:
        """Remove per-sandbox state this substrate keeps outside `state_dir` (e.g. an OCI runtime's state)."""


@dataclass(frozen=True)
class Substrate:
    """One registered substrate."""

    name: str
    drivers: Mapping[str, str]  # what SandboxSpec.driver may say -> the name of the driver it selects
    default_driver: Callable[[ServerConfig], str]  # SandboxSpec.driver == "" selects drivers[default_driver(config)]
    factory: DriverFactory  # (driver name, config, DriverSource) -> a new driver
    capabilities: frozenset[str] = frozenset()
    sweepers: Callable[[], Sequence[Sweeper]] = tuple  # lazy: sweepers may import what registration must not
    description: str = ""
    driver_names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        unknown = self.capabilities - CAPABILITIES
        if unknown:
            raise ValueError(f"substrate {self.name!r}: unknown capabilities {sorted(unknown)}; known: {sorted(CAPABILITIES)}")
        object.__setattr__(self, "driver_names", frozenset(self.drivers.values()))

    def driver_for(self, choice: str, config: ServerConfig) -> str:
        """The driver name a spec's `driver` field selects; raises InvalidSpec listing the choices."""
        picked = choice or self.default_driver(config)
        name = self.drivers.get(picked)
        if name is None:
            raise InvalidSpec(
                f"unknown {self.name} driver {picked!r}; choose one of {', '.join(sorted(set(self.drivers)))}"
            )
        return name


_substrates: dict[str, Substrate] = {}
_loaded: set[str] = set()  # plugin modules (or files) imported
_discovered: str | None = None  # the $DSEC_SUBSTRATE_MODULES value everything is loaded for
_lock = threading.RLock()


def register(substrate: Substrate) -> Substrate:
    """Add a substrate; its name and driver names must be new (re-registering the same record is a no-op)."""
    with _lock:
        existing = _substrates.get(substrate.name)
        if existing is not None:
            if existing == substrate:
                return existing
            raise ValueError(f"substrate {substrate.name!r} is already registered")
        for other in _substrates.values():
            clash = other.driver_names & substrate.driver_names
            if clash:
                raise ValueError(f"substrate {substrate.name!r}: driver names {sorted(clash)} belong to {other.name!r}")
        _substrates[substrate.name] = substrate
        return substrate


def _load(entry: str) -> None:
    if entry.endswith(".py"):
        path = Path(entry).resolve()
        name = f"dsec_substrate_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"${MODULES_ENV}: cannot load {entry}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        importlib.import_module(entry)


def discover() -> None:
    """Import every built-in plugin and every module named in $DSEC_SUBSTRATE_MODULES not imported yet. Cheap when
    nothing changed (every spec validation calls it): one environment read."""
    global _discovered
    named = os.environ.get(MODULES_ENV, "")
    if named == _discovered:
        return
    with _lock:
        for entry in (*BUILTIN, *(e.strip() for e in named.split(",") if e.strip())):
            if entry not in _loaded:
                _load(entry)
                _loaded.add(entry)
        _discovered = named


def names() -> list[str]:
    """Registered substrate names, in registration order (built-ins first)."""
    discover()
    return list(_substrates)


def get(name: str) -> Substrate:
    """The substrate called `name`; raises InvalidSpec listing the registered ones."""
    discover()
    substrate = _substrates.get(name)
    if substrate is None:
        raise InvalidSpec(f"unknown substrate {name!r}; registered: {', '.join(_substrates)}")
    return substrate


def owner_of(driver_name: str) -> Substrate:
    """The substrate whose driver is called `driver_name` (as sandbox records and destroy intents name it)."""
    discover()
    for substrate in _substrates.values():
        if driver_name in substrate.driver_names:
            return substrate
    raise InvalidSpec(f"unknown driver {driver_name!r}; no registered substrate provides it")


def all_substrates() -> list[Substrate]:
    discover()
    return list(_substrates.values())


def sweepers() -> list[Sweeper]:
    """Every registered substrate's sweepers, each once, in stage order (registration order within a stage)."""
    seen: dict[int, Sweeper] = {}
    for substrate in all_substrates():
        for sweeper in substrate.sweepers():
            seen.setdefault(id(sweeper), sweeper)
    return sorted(seen.values(), key=lambda s: s.stage)


def _check_registered(name: str) -> None:
    """`models.Substrate`'s check where this registry is loaded: an unknown name fails validation with the list."""
    known = names()
    if name not in known:
        raise ValueError(f"unknown substrate {name!r}; registered substrates: {', '.join(known)}")


models.check_substrates_with(_check_registered)
