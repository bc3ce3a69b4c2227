"""Sandbox lifecycle: admission, image resolution, driver dispatch, TTLs, snapshots, and teardown."""

from __future__ import annotations

import logging
import math
import secrets
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dsec.config import ServerConfig
from dsec.errors import (
    DsecError,
    InvalidSpec,
    RuntimeFailure,
    SandboxExpired,
    SandboxNotFound,
    SandboxStateError,
    ServerUnavailable,
    SessionNotFound,
)
from dsec.models import PauseKind, SandboxSpec
from dsec.server import orphans
from dsec.server.admission import CreateAdmission
from dsec.server.auth import DEFAULT_TENANT
from dsec.server.drivers import DriverRegistry
from dsec.server.lifetimes import DestroyIntents, Tombstones, crash_point, expired_error
from dsec.server.metrics import CREATE_FAILURES, CREATE_SECONDS, IMAGE_RESOLVES
from dsec.server.pools import WarmPools
from dsec.server.processes import ProcessTable
from dsec.server.readopt import save_record, take_over
from dsec.server.sandbox_events import SandboxEvents
from dsec.server.sessions import OnTimeout, ShellSession
from dsec.server.snapshot_gc import SnapshotGC
from dsec.server.snapshots import SnapshotStore
from dsec.server.teardown_retries import TeardownRetries
from dsec.server.templates import Templates
from dsec.server.volumes import VolumeStore, check_supported
from dsec.server.state import ServerState, reap_dead_servers, write_sandbox_record
from dsec.substrates.base import DriverSandbox, ImageRootfs, SandboxDriver

log = logging.getLogger("dsec.server.manager")

# How long shutdown waits for creates already under way (a VM boot included) before destroying what exists
_LAUNCH_DRAIN_S = 120.0
_SHUTTING_DOWN = "the server is shutting down; create the sandbox on a running server"


@dataclass
class ManagedSandbox:
    sandbox_id: str
    spec: SandboxSpec
    driver_name: str
    driver: SandboxDriver
    handle: DriverSandbox
    image: ImageRootfs
    state_dir: Path
    created_at: float
    expires_at: float
    state: str = "running"
    tenant: str = DEFAULT_TENANT
    timings_ms: dict[str, float] = field(default_factory=dict)
    sessions: dict[str, ShellSession] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    processes: ProcessTable = field(init=False)  # ProcessService's long-lived processes; closed on destroy
    events: SandboxEvents = field(default_factory=SandboxEvents)  # what happened to it (the Logs RPC)
    last_usage: tuple[float, float] | None = None  # (time, cpu seconds) of the previous Metrics sample
    parked: bool = False  # on_timeout=pause: its timeout expired and it now waits paused for paused_ttl_s
    pause_kind: str = ""  # while paused: what the pause keeps (models.PauseKind)
    last_active: float = field(default_factory=time.time)  # when the last call started or ended (idle timeout)
    busy: int = 0  # calls in flight (exec, session command, function call): never idle while one runs
    ended: tuple[str, str] | None = None  # (reason, detail) once torn down: what calls still in flight report
    _env: tuple[SandboxSpec, ImageRootfs, dict[str, str]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.processes = ProcessTable(self.sandbox_id)

    def touch(self) -> None:
        self.last_active = time.time()

    @contextmanager
    def active(self) -> Iterator[None]:
        """Mark a call in flight, so a long exec does not count as idleness."""
        with self.lock:
            self.busy += 1
        try:
            yield
        except RuntimeFailure as exc:
            # the sandbox ended under the call (its timeout, idle timeout or a destroy raced it): the agent's
            # connection closing is the symptom, the end is the cause, so report SandboxExpired(reason)
            if self.ended is None:
                raise
            reason, detail = self.ended
            raise SandboxExpired(f"sandbox {self.sandbox_id} ended during the call ({reason}: {detail}); "
                                 "create a new one", reason=reason, sandbox_id=self.sandbox_id) from exc
        finally:
            with self.lock:
                self.busy -= 1
            self.touch()

    def idle_for(self, now: float) -> float:
        """Seconds without any call started, in flight, or a live process-service process; 0 while busy."""
        if self.busy or self.processes.running():
            return 0.0
        return max(0.0, now - self.last_active)

    def require_running(self) -> None:
        if self.state == "paused":
            raise SandboxStateError(
                f"sandbox {self.sandbox_id} is paused; resume it first (or create it with auto_resume=True)"
            )
        if self.state != "running":
            raise SandboxStateError(f"sandbox {self.sandbox_id} is {self.state}")

    def default_env(self) -> dict[str, str]:
        """The image's environment under the sandbox's own; a new dict the caller may change."""
        return dict(self.exec_env({}))

    def exec_env(self, overrides: Mapping[str, str]) -> Mapping[str, str]:
        """`default_env()` with `overrides` on top, for reading only: without overrides it is the same dict for
        every call, built once per spec (a pool claim gives the sandbox a new spec), not once per exec."""
        cached = self._env
        if cached is None or cached[0] is not self.spec or cached[1] is not self.image:
            env = dict(item.split("=", 1) for item in self.image.config.env if "=" in item)
            env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            env.setdefault("HOME", "/root")
            env.update(self.spec.env)
            cached = self._env = (self.spec, self.image, env)
        return {**cached[2], **overrides} if overrides else cached[2]

    def default_cwd(self) -> str:
        return self.spec.workdir or self.image.config.workdir or "/"


class SandboxManager:
    def __init__(self, config: ServerConfig, state: ServerState, images, drivers: DriverRegistry) -> None:
        self.config = config
        self.state = state
        self.images = images
        self.drivers = drivers
        self._sandboxes: dict[str, ManagedSandbox] = {}
        self.tombstones = Tombstones(config.max_tombstones, config.tombstone_ttl_s)
        self.intents = DestroyIntents(config.home / "destroy-intents")
        self._lock = threading.Lock()
        # Creates under way, so shutdown can wait for them: a create that finishes after shutdown listed the
        # sandboxes would otherwise leave a live sandbox (agent, cgroup, overlay mount) behind an exited server
        self._launches = 0
        self._launches_done = threading.Condition(self._lock)
        self._closing = False
        # Destroys whose teardown finishes in the background (teardown without wait); counted as live until done
        self._tearing_down: set[str] = set()
        self._teardowns = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dsec-teardown")
        self.teardown_retries = TeardownRetries()  # failed teardowns, retried by the reaper thread (still counted live)
        self.admission = CreateAdmission(
            config.max_sandboxes, config.max_concurrent_creates, config.create_queue_limit, config.tenant_max_sandboxes
        )
        self._stop = threading.Event()
        self.snapshots = SnapshotStore(config.home / "snapshots", owner=state.run_dir)
        self.templates = Templates(self, config.templates_dir)
        self.snapshot_gc = SnapshotGC(self.snapshots, config, self.templates.index.pinned, self._snapshot_source_alive,
                                      DEFAULT_TENANT)
        self.snapshot_gc.start()
        self.volumes = VolumeStore(config.volumes_dir)
        self._reaper = threading.Thread(target=self._reap_expired, daemon=True, name="dsec-ttl-reaper")
        self._reaper.start()
        self.pools = WarmPools(self)
        self.adopted_runs: list[ServerState] = []  # dead servers' run dirs taken over at start (readopt.py)

    def start_pools(self) -> None:
        """Begin filling the configured warm pools (after the start-up reap, so they never race it)."""
        self.pools.start()

    # -- crash recovery --------------------------------------------------------------------------------
    def reap_dead_servers(self) -> list[str]:
        """Destroy whatever sandboxes servers that died (kill -9) left behind: first what their run directories
        describe, then (orphans.sweep) what no live server owns although its records are lost."""

        def cleanup(driver_name: str, sandbox_dir: Path) -> None:
            if driver_name:
                self.drivers.get(driver_name).cleanup_state_dir(sandbox_dir)
                orphans.unregister(sandbox_dir.name)  # without a record, only the sweep below can find its remains
            if self.images is not None and hasattr(self.images, "release"):
                self.images.release(sandbox_dir.name)

        for intent in self.intents.finish_dead(cleanup):  # first: these ids must answer with their reason
            self.tombstones.add(intent["sandbox_id"], intent.get("reason", "destroyed"), intent.get("detail", ""),
                                intent.get("tenant", DEFAULT_TENANT), intent.get("at"))
        if self.config.readopt:  # the healthy sandboxes of dead servers come back; the rest are reaped there
            held, _, _ = take_over(self.config.run_root, self.state.run_dir, self.intents.pending_ids(),
                                   self._adopt, cleanup)
            self.adopted_runs += held
            self._reap_once(time.time())  # a timeout that passed while no server ran ends before any call is served
        cleaned = reap_dead_servers(self.config.run_root, cleanup)
        try:
            orphans.sweep(self.config.run_root)
            orphans.sweep_snapshots(self.snapshots.root)
            # volumes held by sandboxes that are gone now (not re-adopted, no live server) are unmounted
            self.volumes.recover(lambda sandbox_id: orphans.registered_dir(sandbox_id) is not None)
        except Exception:  # noqa: BLE001 - a failed sweep must not stop the server; the next start retries
            log.exception("sweeping orphaned sandbox resources failed")
        if cleaned:
            log.warning("cleaned %d sandboxes left by dead servers: %s", len(cleaned), ", ".join(cleaned))
        return cleaned

    def _adopt(self, record: dict, state_dir: Path) -> ManagedSandbox:
        """Serve a live sandbox a dead server left (readopt.py): same id, tenant, spec, expiry and files; the
        driver probes it and raises if it is not healthy."""
        started = time.monotonic()
        sandbox_id = state_dir.name
        spec = SandboxSpec.model_validate(record["spec"])
        driver_name = record["driver"]
        driver = self.drivers.get(driver_name)
        image = self._resolve_image(record["image"])
        paused = record.get("state") == "paused"
        handle = driver.adopt(sandbox_id, spec, image, state_dir, paused)
        if hasattr(self.images, "acquire"):
            self.images.acquire(image.digest, sandbox_id)  # the hold is kept on disk already; renewed, idempotent
        sandbox = ManagedSandbox(
            sandbox_id=sandbox_id, spec=spec, driver_name=driver_name, driver=driver, handle=handle, image=image,
            state_dir=state_dir, created_at=float(record["created_at"]), expires_at=float(record["expires_at"]),
            state="paused" if paused else "running", tenant=record.get("tenant", DEFAULT_TENANT),
            parked=bool(record.get("parked")), timings_ms={"readopt": (time.monotonic() - started) * 1000},
        )  # fmt: skip
        sandbox.events.add("sandbox re-adopted after its server stopped", previous_server=state_dir.parent.name,
                           state=sandbox.state, readopt_ms=round(sandbox.timings_ms["readopt"], 3))
        with self._lock:
            self._sandboxes[sandbox_id] = sandbox
        return sandbox

    # -- lookup ---------------------------------------------------------------------------------------------
    def get(self, sandbox_id: str, tenant: str | None = None) -> ManagedSandbox:
        """The sandbox, if `tenant` (None = the server itself) may see it; others' sandboxes are not found."""
        with self._lock:
            sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is not None and (tenant is None or sandbox.tenant == tenant):
            return sandbox
        stone = self.tombstones.get(sandbox_id, tenant)
        if stone is not None:
            raise expired_error(sandbox_id, stone)
        raise SandboxNotFound(f"no sandbox {sandbox_id!r} on this server (list them with `dsec ls`)")

    def running(self, sandbox_id: str, tenant: str | None = None) -> ManagedSandbox:
        """The sandbox, running; every call on a sandbox starts here, so this is where activity is noted and
        where a paused sandbox created with auto_resume is resumed."""
        sandbox = self.get(sandbox_id, tenant)
        if sandbox.state == "paused" and sandbox.spec.auto_resume:
            self._resume(sandbox, auto=True)
        sandbox.require_running()
        sandbox.touch()
        return sandbox

    def all(self) -> list[ManagedSandbox]:
        with self._lock:
            return list(self._sandboxes.values())

    def list(self, labels: dict[str, str], tenant: str | None = None) -> list[ManagedSandbox]:
        return [
            s
            for s in self.all()
            if (tenant is None or s.tenant == tenant) and all(s.spec.labels.get(k) == v for k, v in labels.items())
        ]

    def _live_of_tenant(self, tenant: str) -> int:
        with self._lock:
            return sum(1 for s in self._sandboxes.values() if s.tenant == tenant)

    def _live_total(self) -> int:
        """Live sandboxes, and the destroyed ones whose teardown is still under way: both hold host resources."""
        with self._lock:
            return len(self._sandboxes) + len(self._tearing_down)

    # -- create / destroy -----------------------------------------------------------------------------------
    def _new_id(self) -> str:
        return "sb-" + secrets.token_hex(8)

    def _resolve_image(self, reference: str) -> ImageRootfs:
        if self.images is None:
            raise InvalidSpec("this server has no image store configured")
        try:
            image = self.images.resolve(reference)
        except DsecError:
            IMAGE_RESOLVES.labels("miss").inc()
            raise
        IMAGE_RESOLVES.labels("hit").inc()
        return image

    def create(self, spec: SandboxSpec, tenant: str = DEFAULT_TENANT) -> ManagedSandbox:
        """A sandbox of `spec`, returned once ready: from its template's snapshot, or with its image's start
        command run and its `ready` probe passed (templates.py; the half-made sandbox is destroyed otherwise)."""
        if spec.template:
            return self.templates.launch(spec, tenant)
        claimed = self.pools.claim(spec, tenant)
        sandbox = claimed if claimed is not None else self._launch(spec, snapshot=None, tenant=tenant)
        self.templates.ready_or_destroy(sandbox, list(sandbox.image.config.start_command) if spec.ready else [],
                                        spec.ready)
        return sandbox

    # -- warm pools (pools.py) ------------------------------------------------------------------------------
    def pool_headroom(self) -> bool:
        """Room for one more pooled sandbox: live + pooled + creates under way stay under max_sandboxes."""
        return self._live_total() + self.pools.pooled_count + self.admission.pending < self.config.max_sandboxes

    def launch_pooled(self, spec: SandboxSpec) -> ManagedSandbox:
        """Create a sandbox for a warm pool (the caller holds a background admission slot); it is not live (not
        listed, not gettable) until `adopt_claimed`."""
        with self._lock:
            if self._closing:
                raise ServerUnavailable(_SHUTTING_DOWN)
            self._launches += 1
        try:
            return self._launch_tracked(spec, None, DEFAULT_TENANT, self.drivers.name_for(spec), register=False)
        finally:
            with self._lock:
                self._launches -= 1
                self._launches_done.notify_all()

    def adopt_claimed(self, sandbox: ManagedSandbox, spec: SandboxSpec, tenant: str, started: float) -> None:
        """Give a pooled sandbox its claimer's identity and make it live, under the same capacity and quota as a
        create. Its processes get `spec.env` through every exec's environment (default_env)."""

        def insert() -> None:
            with self._lock:
                if self._closing:
                    raise ServerUnavailable(_SHUTTING_DOWN)
                now = time.time()
                filled_ms = sandbox.timings_ms.get("total", 0.0)
                sandbox.spec, sandbox.tenant = spec, tenant
                sandbox.created_at, sandbox.expires_at, sandbox.last_active = now, now + spec.timeout_s, now
                claim_ms = (time.monotonic() - started) * 1000
                sandbox.timings_ms = {"pool_claim": claim_ms, "pool_fill": filled_ms, "total": claim_ms}
                self._sandboxes[sandbox.sandbox_id] = sandbox

        self.admission.admit_claim(tenant, self._live_total, self._live_of_tenant, insert)
        with sandbox.lock:
            save_record(sandbox)  # the crash-cleanup record now names the claimer (tenant, spec, expiry): one write
        sandbox.events.add("sandbox claimed from a warm pool", image=spec.image, substrate=spec.substrate,
                           driver=sandbox.driver_name, claim_ms=round(sandbox.timings_ms["pool_claim"], 3))

    def _launch(self, spec: SandboxSpec, snapshot: Path | None, tenant: str) -> ManagedSandbox:
        driver_name = self.drivers.name_for(spec)
        if spec.volumes:
            check_supported(spec.substrate)
        with self.admission.slot(tenant, self._live_total, self._live_of_tenant):
            started = time.monotonic()
            try:
                sandbox = self._launch_admitted(spec, snapshot, tenant, driver_name)
            except Exception as error:
                CREATE_FAILURES.labels(type(error).__name__).inc()
                raise
            elapsed = time.monotonic() - started
            self.admission.record_create_time(elapsed)
            CREATE_SECONDS.labels(spec.substrate, driver_name).observe(elapsed)
            return sandbox

    def _launch_admitted(self, spec: SandboxSpec, snapshot: Path | None, tenant: str, driver_name: str) -> ManagedSandbox:
        with self._lock:
            if self._closing:
                raise ServerUnavailable(_SHUTTING_DOWN)
            self._launches += 1
        try:
            sandbox = self._launch_tracked(spec, snapshot, tenant, driver_name)
            with self._lock:
                closing = self._closing
            if closing:  # destroyed before the count drops: shutdown returns only once it is gone
                self.destroy(sandbox.sandbox_id, detail="destroyed at server shutdown")
                raise ServerUnavailable(_SHUTTING_DOWN)
            return sandbox
        finally:
            with self._lock:
                self._launches -= 1
                self._launches_done.notify_all()

    def _launch_tracked(
        self, spec: SandboxSpec, snapshot: Path | None, tenant: str, driver_name: str, register: bool = True
    ) -> ManagedSandbox:
        started = time.monotonic()
        image = self._resolve_image(spec.image)
        resolved = time.monotonic()
        sandbox_id = self._new_id()
        state_dir = self.state.sandbox_dir(sandbox_id)
        driver = self.drivers.get(driver_name)
        try:
            write_sandbox_record(
                state_dir, {"driver": driver_name, "sandbox_id": sandbox_id, "image": image.digest, "tenant": tenant}
            )
            orphans.register(sandbox_id, state_dir)
            if hasattr(self.images, "acquire"):
                self.images.acquire(image.digest, sandbox_id)
            if spec.volumes:  # held (and mounted on the host) before the driver binds them; released at teardown
                self.volumes.acquire(sandbox_id, [(v.name, v.read_only) for v in spec.volumes], tenant, spec.substrate)
            if snapshot is None:
                handle = driver.create(sandbox_id, spec, image, state_dir)
            else:
                handle = driver.restore(sandbox_id, spec, image, snapshot, state_dir)
        except BaseException:
            self._discard_state(driver, driver_name, state_dir, sandbox_id)
            raise
        now = time.time()
        sandbox = ManagedSandbox(
            sandbox_id=sandbox_id,
            spec=spec,
            driver_name=driver_name,
            driver=driver,
            handle=handle,
            image=image,
            state_dir=state_dir,
            created_at=now,
            expires_at=now + spec.timeout_s,
            tenant=tenant,
            timings_ms={
                "resolve_image": (resolved - started) * 1000,
                "driver_create": (time.monotonic() - resolved) * 1000,
                # the driver's own phases (disk, mount, runtime_run...), where it times them
                **{f"driver_{phase}": seconds * 1000 for phase, seconds in getattr(handle, "create_timings", {}).items()},
                "total": (time.monotonic() - started) * 1000,
            },
        )
        sandbox.events.add("sandbox restored from a snapshot" if snapshot is not None else "sandbox created",
                           image=spec.image, substrate=spec.substrate, driver=driver_name,
                           create_ms=round(sandbox.timings_ms["total"]))
        if register:
            save_record(sandbox)
            with self._lock:
                self._sandboxes[sandbox_id] = sandbox
        return sandbox

    def _discard_state(self, driver: SandboxDriver, driver_name: str, state_dir: Path, sandbox_id: str) -> None:
        try:
            driver.cleanup_state_dir(state_dir)
            orphans.unregister(sandbox_id)
        except Exception:  # noqa: BLE001 - still registered: the orphan sweep after this server dies finishes it
            log.exception("cleanup after failed create of %s", sandbox_id)
        shutil.rmtree(state_dir, ignore_errors=True)
        if hasattr(self.images, "release"):
            self.images.release(sandbox_id)
        self.volumes.release(sandbox_id)

    def destroy(self, sandbox_id: str, reason: str = "destroyed", tenant: str | None = None,
                detail: str = "destroyed by its owner", wait: bool = True) -> None:
        """End a sandbox; its id then answers SandboxExpired(reason) for `tombstone_ttl_s`. Destroying twice is
        fine. `reason` is one of SandboxExpired.REASONS (timeout | idle | destroyed | lost). Without `wait`, it
        returns once the sandbox's processes are killed (where its driver can say so, `SandboxDriver.stop`) and
        the rest of the teardown runs in the background: see `teardown`."""
        with self._lock:
            sandbox = self._sandboxes.get(sandbox_id)
            if sandbox is not None and (tenant is None or sandbox.tenant == tenant):
                del self._sandboxes[sandbox_id]
            else:
                sandbox = None
        if sandbox is None:
            if self.tombstones.get(sandbox_id, tenant) is not None:
                return
            raise SandboxNotFound(f"no sandbox {sandbox_id!r} on this server")
        self.tombstones.add(sandbox_id, reason, detail, sandbox.tenant)
        self.teardown(sandbox, reason, detail, wait=wait)

    def teardown(self, sandbox: ManagedSandbox, reason: str, detail: str, wait: bool = True) -> None:
        """Tear down a sandbox no table holds any more, behind a durable destroy intent (lifetimes.py).

        Without `wait`, once its driver has stopped it (every process killed) the unmounts, cgroup and file
        removal run on a background thread: they cost a destroy ~5-10 ms here, none of which its caller needs.
        Until that ends the sandbox still counts against `max_sandboxes` (`_live_total`), shutdown waits for it,
        and a server killed meanwhile leaves its intent, which the next start finishes. A sandbox holding volumes
        is always torn down before returning: the next writer of a volume must find it released."""
        sandbox_id = sandbox.sandbox_id
        self.intents.record(sandbox_id, driver=sandbox.driver_name, state_dir=sandbox.state_dir,
                            run_dir=self.state.run_dir, reason=reason, detail=detail, tenant=sandbox.tenant)
        crash_point("destroy-after-intent")
        with sandbox.lock:
            sandbox.state = "destroyed"
            sandbox.ended = (reason, detail)
            sandbox.processes.close()
            for session in sandbox.sessions.values():
                session.close()
            later = not wait and not sandbox.spec.volumes and sandbox.driver.stop(sandbox.handle)
            if later:
                with self._lock:
                    self._tearing_down.add(sandbox_id)
        if later:
            try:
                self._teardowns.submit(self._finish_teardown, sandbox, reason, detail)
            except RuntimeError:  # the pool is shut down (server stopping): finish it here
                self._finish_teardown(sandbox, reason, detail)
            return
        try:
            with sandbox.lock:
                self._release(sandbox)
        except Exception:  # the caller hears of it; the sandbox still holds host resources, so it is retried
            self._teardown_failed(sandbox, reason, detail)
            raise
        self.intents.done(sandbox_id)
        sandbox.events.add("sandbox ended", reason=reason, detail=detail)

    def _finish_teardown(self, sandbox: ManagedSandbox, reason: str, detail: str) -> None:
        """The background part of a destroy that did not wait; a failure is retried (teardown_retries.py)."""
        self._try_release(sandbox, reason, detail)

    def _try_release(self, sandbox: ManagedSandbox, reason: str, detail: str) -> bool:
        """One teardown attempt nobody waits for: True once done (the sandbox no longer counted); on a failure the
        next attempt is scheduled."""
        try:
            with sandbox.lock:
                self._release(sandbox)
        except Exception:  # noqa: BLE001 - nobody waits for this thread: the reaper tries again later
            self._teardown_failed(sandbox, reason, detail)
            return False
        self.intents.done(sandbox.sandbox_id)
        sandbox.events.add("sandbox ended", reason=reason, detail=detail)
        with self._lock:
            self._tearing_down.discard(sandbox.sandbox_id)
        return True

    def _teardown_failed(self, sandbox: ManagedSandbox, reason: str, detail: str) -> None:
        """Keep the sandbox counted (it holds mounts, a cgroup, a disk) and schedule another attempt; its intent
        stays, so a server that stops first leaves the destroy to the next start."""
        with self._lock:
            self._tearing_down.add(sandbox.sandbox_id)
        entry = self.teardown_retries.failed(sandbox, reason, detail, time.monotonic())
        sandbox.events.add("teardown failed; retrying", attempts=entry.attempts,
                           retry_in_s=round(entry.due_at - time.monotonic(), 1))

    def _retry_teardowns(self, now: float) -> None:
        """Run the failed teardowns whose next attempt is due (the reaper thread, and once more at shutdown)."""
        for entry in self.teardown_retries.take_due(now):
            if self._try_release(entry.sandbox, entry.reason, entry.detail):
                log.info("teardown of %s succeeded on attempt %d", entry.sandbox.sandbox_id, entry.attempts + 1)

    def _release(self, sandbox: ManagedSandbox) -> None:
        """The driver's destroy, then what the server holds for the sandbox (caller holds `sandbox.lock`)."""
        sandbox_id = sandbox.sandbox_id
        try:
            sandbox.driver.destroy(sandbox.handle)
        except BaseException:
            # keep the state dir and the intent: retried while this server runs, else finished by the next start
            log.exception("destroy of %s failed; its intent and state stay until a retry or the next start finishes it",
                          sandbox_id)
            raise
        shutil.rmtree(sandbox.state_dir, ignore_errors=True)
        orphans.unregister(sandbox_id)
        if hasattr(self.images, "release"):
            self.images.release(sandbox_id)
        self.volumes.release(sandbox_id)

    def set_timeout(self, sandbox_id: str, timeout_s: float, tenant: str | None = None, extend: bool = False) -> ManagedSandbox:
        """End the sandbox `timeout_s` from now; with `extend` (keep-alive) never earlier than it already would.
        Either way it is activity, so the idle clock restarts."""
        if not (0 < timeout_s <= 7 * 24 * 3600):
            raise InvalidSpec(f"timeout_s must be in (0, 604800], got {timeout_s}")
        sandbox = self.get(sandbox_id, tenant)
        wanted = time.time() + timeout_s
        with sandbox.lock:
            sandbox.expires_at = max(sandbox.expires_at, wanted) if extend else wanted
            save_record(sandbox)
        sandbox.touch()
        sandbox.events.add("kept alive" if extend else "timeout set", timeout_s=timeout_s)
        return sandbox

    def _reap_expired(self) -> None:
        """TTLs are enforced here, by the node that runs the sandbox: a cluster gateway only relays."""
        while not self._stop.wait(0.5):
            self._reap_once(time.time())
            self._retry_teardowns(time.monotonic())

    def _reap_once(self, now: float) -> None:
        """End (or park) every sandbox whose timeout or idle timeout has passed by `now`."""
        with self._lock:
            live = list(self._sandboxes.values())
        expired = [s.sandbox_id for s in live if s.expires_at <= now]
        parking = [s for s in live if s.sandbox_id in expired and s.spec.on_timeout == "pause" and not s.parked]
        for sandbox in parking:
            if self._park(sandbox, now):
                expired.remove(sandbox.sandbox_id)
        idle = [s for s in live if s.sandbox_id not in expired and s.state == "running"
                and s.spec.idle_timeout_s and s.idle_for(now) >= s.spec.idle_timeout_s]
        ending = [(sid, "timeout", "its timeout expired") for sid in expired]
        ending += [(s.sandbox_id, "idle", f"no call for {s.spec.idle_timeout_s:g}s") for s in idle]
        for sandbox_id, reason, detail in ending:
            try:
                self.destroy(sandbox_id, reason=reason, detail=detail)
            except DsecError:
                pass
            except Exception:  # noqa: BLE001 - keep reaping the others
                log.exception("%s destroy of %s failed", reason, sandbox_id)

    def _park(self, sandbox: ManagedSandbox, now: float) -> bool:
        """on_timeout=pause: pause the sandbox (if it runs) and keep it for paused_ttl_s; False if that failed.
        A memory pause where the substrate and host allow it (it then holds no CPU and no RAM), else a freeze."""
        try:
            with sandbox.lock:
                if sandbox.state == "running":
                    try:
                        self._pause_locked(sandbox, "memory")
                    except DsecError as exc:  # refused (Unsupported) or failed, leaving the sandbox running
                        sandbox.events.add("memory pause unavailable; freezing instead", reason=exc.message)
                        self._pause_locked(sandbox, "freeze")
                elif sandbox.state != "paused":
                    return False
                sandbox.parked = True
                sandbox.expires_at = now + self.config.paused_ttl_s
                save_record(sandbox)
        except Exception:  # noqa: BLE001 - a sandbox that cannot pause is destroyed as its timeout says otherwise
            log.exception("pause at the timeout of %s failed; destroying it", sandbox.sandbox_id)
            return False
        sandbox.events.add("sandbox paused at its timeout", paused_ttl_s=self.config.paused_ttl_s, kind=sandbox.pause_kind)
        return True

    def shutdown(self) -> None:
        """Refuse new creates, let the ones under way finish (bounded), then destroy every sandbox."""
        self._stop.set()
        self.pools.stop()
        self.snapshot_gc.stop()
        with self._lock:
            self._closing = True
            if not self._launches_done.wait_for(lambda: self._launches == 0, timeout=_LAUNCH_DRAIN_S):
                log.warning("%d creates still under way at shutdown; each destroys its sandbox when it ends",
                            self._launches)
            ids = list(self._sandboxes)
        for sandbox_id in ids:
            try:
                self.destroy(sandbox_id, detail="destroyed at server shutdown")
            except Exception:  # noqa: BLE001 - destroy the rest regardless
                log.exception("shutdown destroy of %s failed", sandbox_id)
        self._teardowns.shutdown(wait=True)  # background teardowns end before the server does
        self._retry_teardowns(math.inf)  # one last attempt for the failed ones; what fails again waits for the next start
        for run in self.adopted_runs:  # emptied by the destroys above; what failed stays for the next start
            run.release()
        self.adopted_runs = []

    # -- sessions -------------------------------------------------------------------------------------------
    def start_session(
        self, sandbox_id: str, env: dict[str, str], cwd: str, shell: str, tenant: str | None = None,
        on_timeout: OnTimeout = "interrupt",
    ) -> ShellSession:
        sandbox = self.running(sandbox_id, tenant)
        session_id = "ss-" + secrets.token_hex(6)
        merged = sandbox.default_env() | env
        session = ShellSession(
            sandbox.handle, session_id, shell or "/bin/sh", merged, cwd or sandbox.default_cwd(), on_timeout
        )
        with sandbox.lock:
            sandbox.sessions[session_id] = session
        return session

    def session(self, sandbox_id: str, session_id: str, tenant: str | None = None) -> ShellSession:
        sandbox = self.running(sandbox_id, tenant)
        session = sandbox.sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r} in sandbox {sandbox_id}")
        return session

    def close_session(self, sandbox_id: str, session_id: str, tenant: str | None = None) -> None:
        sandbox = self.get(sandbox_id, tenant)
        session = sandbox.sessions.pop(session_id, None)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r} in sandbox {sandbox_id}")
        session.close()

    # -- pause / snapshot / restore / fork ----------------------------------------------------------------
    def pause(self, sandbox_id: str, tenant: str | None = None, kind: PauseKind = "freeze") -> ManagedSandbox:
        """Pause a running sandbox, keeping what `kind` says (docs/lifecycle.md); never auto-resumes it first."""
        sandbox = self.get(sandbox_id, tenant)
        with sandbox.lock:
            sandbox.require_running()
            self._pause_locked(sandbox, kind)
            save_record(sandbox)
        sandbox.events.add("sandbox paused", kind=kind)
        return sandbox

    def _pause_locked(self, sandbox: ManagedSandbox, kind: PauseKind) -> None:
        """Pause under `sandbox.lock`. Where the pause ends the agent connection that sessions and process
        streams run over (containers' memory and files pauses), the host's handles on them go: sessions are
        closed first (a shell lives only for its host stream), process streams after (a memory pause keeps the
        processes themselves inside the sandbox)."""
        sandbox.handle.check_pause(kind)  # Unsupported (with its reason) before anything is touched
        keeps = sandbox.handle.keeps_streams(kind)
        if not keeps:
            for session in sandbox.sessions.values():
                session.close()
            sandbox.sessions.clear()
        sandbox.handle.pause(kind)
        if not keeps:
            ended, sandbox.processes = sandbox.processes, ProcessTable(sandbox.sandbox_id)
            ended.close()
        sandbox.state, sandbox.pause_kind = "paused", kind

    def resume(self, sandbox_id: str, tenant: str | None = None) -> ManagedSandbox:
        sandbox = self.get(sandbox_id, tenant)
        self._resume(sandbox)
        return sandbox

    def _resume(self, sandbox: ManagedSandbox, auto: bool = False) -> None:
        """Resume under `sandbox.lock`; `auto` (a call on an auto_resume sandbox): one another call resumed
        meanwhile is fine."""
        with sandbox.lock:
            if sandbox.state != "paused":
                if auto and sandbox.state == "running":
                    return
                raise SandboxStateError(f"sandbox {sandbox.sandbox_id} is {sandbox.state}, not paused")
            started = time.monotonic()
            sandbox.handle.resume()
            kind, sandbox.state, sandbox.pause_kind = sandbox.pause_kind, "running", ""
            sandbox.touch()  # the idle clock stood still while it was paused
            if sandbox.spec.on_timeout == "pause":  # back from its timeout's pause: a whole timeout again
                sandbox.parked = False
                sandbox.expires_at = time.time() + sandbox.spec.timeout_s
            save_record(sandbox)
        event = "sandbox resumed by a call (auto_resume)" if auto else "sandbox resumed"
        sandbox.events.add(event, kind=kind, resume_ms=round((time.monotonic() - started) * 1000, 3))

    def snapshot(self, sandbox_id: str, name: str, tenant: str | None = None, temporary: bool = False,
                 ttl_s: float = 0.0, for_fork: bool = False) -> dict:
        """`ttl_s` > 0: the snapshot GC removes it that long from now (snapshot_gc.py). `for_fork`: the
        substrate's fork_snapshot (a runc container's also carries its running processes)."""
        if not 0 <= ttl_s <= 10 * 365 * 86400:  # NaN fails this too
            raise InvalidSpec(f"snapshot ttl_s must be between 0 (none) and ten years, got {ttl_s}")
        sandbox = self.running(sandbox_id, tenant)
        snapshot_id, data = self.snapshots.new(temporary)
        try:
            with sandbox.lock:
                kind = sandbox.handle.fork_snapshot(data) if for_fork else sandbox.handle.snapshot(data)
            meta = {
                "snapshot_id": snapshot_id,
                "sandbox_id": sandbox_id,
                "name": name,
                "kind": kind,
                "created_at": (taken := time.time()),
                "spec": sandbox.spec.model_dump(),
                "image": sandbox.image.digest,
                "tenant": sandbox.tenant,
                "expires_at": taken + ttl_s if ttl_s else 0.0,
            }
            self.snapshots.publish(snapshot_id, meta)
        except BaseException:
            self.snapshots.discard(snapshot_id)
            raise
        return meta

    def list_snapshots(self, tenant: str | None = None, sandbox_id: str = "") -> list[dict]:
        pinned = self.templates.index.pinned()
        return [{**m, "pinned": m["snapshot_id"] in pinned} for m in self.snapshots.list(tenant, DEFAULT_TENANT, sandbox_id)]

    def delete_snapshot(self, snapshot_id: str, tenant: str | None = None) -> None:
        self.snapshots.meta(snapshot_id, tenant, DEFAULT_TENANT)  # exists and is the caller's
        if snapshot_id in self.templates.index.pinned():
            raise InvalidSpec(f"snapshot {snapshot_id} belongs to a template; delete the template instead")
        self.snapshots.delete(snapshot_id)

    def _snapshot_source_alive(self, sandbox_id: str) -> bool:
        """Whether the sandbox a snapshot was taken of still lives here or on another server of this machine."""
        with self._lock:
            if sandbox_id in self._sandboxes:
                return True
            if sandbox_id in self._tearing_down:  # destroyed; its registration goes when the teardown ends
                return False
        return orphans.registered_dir(sandbox_id) is not None

    def launch_snapshot(self, snapshot_id: str, spec: SandboxSpec, tenant: str) -> ManagedSandbox:
        """A sandbox of `spec` from a snapshot's data, which a delete or the GC leaves alone while it is read."""
        with self.snapshots.reading(snapshot_id) as data:
            return self._launch(spec, snapshot=data, tenant=tenant)

    def restore(
        self, snapshot_id: str, labels: dict[str, str], timeout_s: float, tenant: str | None = None
    ) -> ManagedSandbox:
        meta = self.snapshots.meta(snapshot_id, tenant, DEFAULT_TENANT)
        spec = SandboxSpec.model_validate(meta["spec"])
        spec = spec.model_copy(update={"image": meta["image"], "labels": spec.labels | labels})
        if timeout_s > 0:
            spec = spec.model_copy(update={"timeout_s": timeout_s})
        return self.launch_snapshot(snapshot_id, spec, meta.get("tenant", DEFAULT_TENANT))

    def fork(self, sandbox_id: str, n: int, tenant: str | None = None) -> list[ManagedSandbox]:
        """`n` copies of a running sandbox, through a snapshot of its own that is deleted afterwards."""
        if not (1 <= n <= 100):
            raise InvalidSpec(f"fork count must be between 1 and 100, got {n}")
        meta = self.snapshot(sandbox_id, name=f"fork-of-{sandbox_id}", tenant=tenant, temporary=True, for_fork=True)
        forks: list[ManagedSandbox] = []
        try:
            for _ in range(n):
                labels = {"dsec.fork_of": sandbox_id, "dsec.fork_kind": meta["kind"]}  # "processes": they run on
                forks.append(self.restore(meta["snapshot_id"], labels, 0, tenant))
        except BaseException:
            for sandbox in forks:
                self.destroy(sandbox.sandbox_id)
            raise
        finally:
            self.snapshots.delete(meta["snapshot_id"])
        return forks
