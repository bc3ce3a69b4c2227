"""Warm pools: ready sandboxes of configured shapes, claimed by the creates that match them.

Why: a cold create (overlay mount, OCI runtime, agent handshake; a VM boot) is tens to hundreds of milliseconds
and collapses under bursts; an RL step should not wait on it. The server keeps `size` sandboxes per shape
(image digest, substrate driver, resources) ready; a create whose spec has that shape takes one at once.

Rules that keep it honest:
- A pooled sandbox is never exposed before its claim (not listed, not gettable, counted against no tenant), so a
  claim is always a never-used sandbox with the fresh writable layer its create made. It is claimed once.
- Its identity is applied at claim: the id (minted at fill, first shown at claim, never reused), tenant,
  labels, timeout, idle timeout and env (env reaches processes through every exec's environment, built from the
  spec per call, so no restart is needed).
- With `max_size` above `size`, a pool adapts to demand: it keeps as many ready as creates of its shape asked
  for in the last minute (claims + misses), between `size` and `max_size`; surplus beyond that is destroyed.
- Refills run in one background thread at most `pool_refill_per_s` a second, and only take an admission slot
  when no user create is waiting for one (`CreateAdmission.try_background_slot`), so they yield to users.
- Pooled sandboxes have state dirs and registry entries like any other: a crash leaves nothing the next start
  does not reap, and shutdown destroys them with the rest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dsec.config import PoolConfig
from dsec.errors import DsecError, InvalidSpec, PermissionDenied
from dsec.models import Resources, SandboxSpec
from dsec.server.auth import DEFAULT_TENANT
from dsec.server.metrics import POOL_CLAIMS

if TYPE_CHECKING:
    from dsec.server.manager import ManagedSandbox, SandboxManager

log = logging.getLogger("dsec.server.pools")

DEMAND_WINDOW_S = 60.0  # an adaptive pool keeps as many ready as creates of its shape in this window

POOL_LABEL = "dsec.pool"
# Fields of a spec that a sandbox is built with and pools never vary (so a claim needs their defaults); the
# egress allowlist is built in too, and part of the shape. Everything else is identity, applied at claim.
_BUILT_WITH = ("network", "workdir", "volumes")
# their defaults, computed once: pydantic's get_default inspects the factory's signature (~0.2 ms per field)
_BUILT_WITH_DEFAULTS = {name: SandboxSpec.model_fields[name].get_default(call_default_factory=True) for name in _BUILT_WITH}


@dataclass(frozen=True)
class ShapeKey:
    digest: str
    driver: str
    resources: tuple[float, int, int, int]
    network_allow: tuple[str, ...]


def shape_key(digest: str, driver: str, spec: SandboxSpec) -> ShapeKey:
    r = spec.resources
    return ShapeKey(digest, driver, (r.cpu, r.memory_mb, r.pids, r.disk_mb), tuple(spec.network_allow))


@dataclass
class Pool:
    config: PoolConfig
    spec: SandboxSpec  # what its sandboxes are created with
    key: ShapeKey
    size: int
    max_size: int = 0  # > size: adapt to demand up to this
    ready: list[ManagedSandbox] = field(default_factory=list)
    filling: int = 0
    claims: int = 0
    misses: int = 0
    last_error: str = ""
    failures: int = 0  # consecutive refill failures (backoff)
    retry_at: float = 0.0
    demand: deque[float] = field(default_factory=deque)  # monotonic times of recent claims and misses

    def note_demand(self, now: float) -> None:
        self.demand.append(now)
        while self.demand and self.demand[0] < now - DEMAND_WINDOW_S:
            self.demand.popleft()
        while len(self.demand) > max(self.max_size, self.size, 1):
            self.demand.popleft()  # more than max_size changes nothing: stay bounded

    def target(self, now: float) -> int:
        """How many ready sandboxes to keep now: `size`, or up to `max_size` following recent demand."""
        if self.max_size <= self.size:
            return self.size
        recent = sum(1 for t in self.demand if t >= now - DEMAND_WINDOW_S)
        return min(self.max_size, max(self.size, recent))


class WarmPools:
    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager
        self._pools: dict[ShapeKey, Pool] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._interval = 1.0 / manager.config.pool_refill_per_s

    # -- configuration -----------------------------------------------------------------------------------
    def _spec_of(self, config: PoolConfig) -> SandboxSpec:
        defaults = self.manager.config.default_resources
        try:
            resources = Resources(cpu=config.cpu or defaults.cpu, memory_mb=config.memory_mb or defaults.memory_mb,
                                  pids=config.pids or defaults.pids, disk_mb=config.disk_mb or defaults.disk_mb)
            return SandboxSpec(image=config.image, substrate=config.substrate, driver=config.driver, resources=resources,
                               network_allow=config.network_allow, timeout_s=self.manager.config.default_timeout_s)
        except ValueError as exc:
            raise InvalidSpec(f"invalid pool shape: {exc}") from None

    def resize(self, config: PoolConfig, tenant: str | None = None) -> Pool:
        """Create, resize or (size 0) remove the pool of `config`'s shape. Pools are the operator's: with auth on,
        only the default tenant may change them."""
        if tenant is not None and tenant != DEFAULT_TENANT:
            raise PermissionDenied(f"tenant {tenant!r} may not change warm pools; ask the server's operator")
        spec = self._spec_of(config)
        driver = self.manager.drivers.name_for(spec)
        digest = self.manager._resolve_image(spec.image).digest
        key = shape_key(digest, driver, spec)
        with self._cond:
            pool = self._pools.get(key)
            if pool is None:
                pool = Pool(config=config, spec=spec, key=key, size=config.size)
                self._pools[key] = pool
            pool.size, pool.max_size = config.size, config.max_size if config.size else 0
            keep = pool.target(time.monotonic())
            surplus = pool.ready[keep:] if len(pool.ready) > keep else []
            del pool.ready[len(pool.ready) - len(surplus):]
            if pool.size == 0 and not pool.filling:
                del self._pools[key]
            pool.failures, pool.retry_at = 0, 0.0
            self._cond.notify_all()
        for sandbox in surplus:
            self._discard(sandbox, "pool shrunk")
        return pool

    def list(self) -> list[Pool]:
        with self._cond:
            return list(self._pools.values())

    @property
    def pooled_count(self) -> int:
        with self._cond:
            return sum(len(p.ready) + p.filling for p in self._pools.values())

    # -- claims ------------------------------------------------------------------------------------------
    def claim(self, spec: SandboxSpec, tenant: str) -> ManagedSandbox | None:
        """A ready sandbox of `spec`'s shape with `spec`'s identity applied, or None (create cold)."""
        with self._cond:
            if not self._pools or any(getattr(spec, name) != default for name, default in _BUILT_WITH_DEFAULTS.items()):
                return None
        started = time.monotonic()
        try:
            driver = self.manager.drivers.name_for(spec)
            digest = self.manager._resolve_image(spec.image).digest
        except DsecError:
            return None  # the cold path reports it
        key = shape_key(digest, driver, spec)
        with self._cond:
            pool = self._pools.get(key)
            if pool is None:
                return None
            pool.note_demand(time.monotonic())
            if not pool.ready:
                pool.misses += 1
                POOL_CLAIMS.labels("miss").inc()
                self._cond.notify_all()
                return None
            sandbox = pool.ready.pop()
            pool.claims += 1
            self._cond.notify_all()  # refill
        POOL_CLAIMS.labels("hit").inc()
        try:
            self.manager.adopt_claimed(sandbox, spec, tenant, started)
        except BaseException:
            self._discard(sandbox, "claim refused")
            raise
        return sandbox

    # -- refill ------------------------------------------------------------------------------------------
    def start(self) -> None:
        for config in self.manager.config.pools:
            try:
                self.resize(config)
            except DsecError as error:
                log.error("warm pool %s/%s not started: %s", config.image, config.substrate, error)
        self._thread = threading.Thread(target=self._refill_loop, daemon=True, name="dsec-pool-refill")
        self._thread.start()

    def _next_short(self) -> Pool | None:
        now = time.monotonic()
        short = [p for p in self._pools.values() if len(p.ready) + p.filling < p.target(now) and p.retry_at <= now]
        return min(short, key=lambda p: (len(p.ready) + p.filling) / p.target(now)) if short else None

    def _take_surplus(self) -> list[ManagedSandbox]:
        """Ready sandboxes beyond their pool's target (an adaptive pool whose demand fell)."""
        now, surplus = time.monotonic(), []
        for pool in self._pools.values():
            while len(pool.ready) > pool.target(now):
                surplus.append(pool.ready.pop(0))
        return surplus

    def _refill_loop(self) -> None:
        while True:
            with self._cond:
                pool, surplus = self._next_short(), self._take_surplus()
                while not self._stop and pool is None and not surplus:
                    self._cond.wait(timeout=1.0)  # wakes for claims/resizes; the timeout re-checks backoffs/demand
                    pool, surplus = self._next_short(), self._take_surplus()
                stopping = self._stop
                if pool is not None and not stopping:
                    pool.filling += 1
            for sandbox in surplus:
                self._discard(sandbox, "demand fell")
            if stopping:
                return
            if pool is None:
                continue
            try:
                self._fill_one(pool)
            finally:
                with self._cond:
                    pool.filling -= 1
                    if pool.size == 0 and not pool.filling and not pool.ready:
                        self._pools.pop(pool.key, None)
                    self._cond.notify_all()
            if self._stop_requested(self._interval):
                return

    def _stop_requested(self, wait_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._stop, timeout=wait_s)

    def _fill_one(self, pool: Pool) -> None:
        admission = self.manager.admission
        while not admission.try_background_slot(self.manager.pool_headroom):
            if self._stop_requested(0.05):  # users are waiting or the server is full: yield
                return
        try:
            spec = pool.spec.model_copy(update={"labels": {POOL_LABEL: pool.config.image}})
            sandbox = self.manager.launch_pooled(spec)
        except Exception as error:  # noqa: BLE001 - a refill failure is reported on the pool, then retried later
            with self._cond:
                pool.failures += 1
                pool.last_error = f"{type(error).__name__}: {error}"[:500]
                pool.retry_at = time.monotonic() + min(30.0, 0.5 * 2 ** min(pool.failures, 6))
            log.warning("refilling warm pool %s failed: %s", pool.config.image, pool.last_error)
            return
        finally:
            admission.release_background_slot()
        with self._cond:
            keep = not self._stop and pool.target(time.monotonic()) > len(pool.ready)
            if keep:
                pool.ready.append(sandbox)
                pool.failures, pool.last_error = 0, ""
        if not keep:
            self._discard(sandbox, "pool full or stopping")

    # -- teardown ----------------------------------------------------------------------------------------
    def _discard(self, sandbox: ManagedSandbox, why: str) -> None:
        try:
            self.manager.teardown(sandbox, "destroyed", f"warm pool: {why}")
        except Exception:  # noqa: BLE001 - its records stay; the next start's reap finishes it
            log.exception("destroying pooled sandbox %s failed", sandbox.sandbox_id)

    def stop(self) -> None:
        """Stop refilling, wait for a refill under way, destroy every ready sandbox."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=180)
        with self._cond:
            ready = [s for p in self._pools.values() for s in p.ready]
            for pool in self._pools.values():
                pool.ready.clear()
        for sandbox in ready:
            self._discard(sandbox, "server shutdown")

