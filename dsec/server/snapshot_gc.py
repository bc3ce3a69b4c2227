"""Snapshot GC: a background pass every `snapshot_gc_interval_s`, and the same pass on demand (SnapshotGC RPC).

Why: snapshots used to be collected never, and a training run that snapshots every episode fills the disk.
A pass removes expired snapshots (ttl_s), snapshots of sandboxes that are gone beyond the per-tenant budget
(`snapshot_keep` newest, `snapshot_max_bytes` together: SnapshotStore.collect) and fork temporaries of dead
servers (orphans.sweep_snapshots). Pinned snapshots (templates, read from the shared index so every server on
the machine honours every pin) and snapshots a restore is reading are never touched. Each pass also removes the
files pulled VM snapshots linked under the VM root that no snapshot and no VM sandbox names any more
(dsec/substrates/vm/pulled_gc.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dsec.config import ServerConfig
from dsec.server import orphans
from dsec.server.snapshots import DATA, TEMPORARY, SnapshotStore
from dsec.substrates.vm.config import VmConfig
from dsec.substrates.vm.driver import MACHINE_RECORD, SNAPSHOT_META
from dsec.substrates.vm.pulled_gc import collect_pulled
from dsec.substrates.vm.template import META as TEMPLATE_META

log = logging.getLogger("dsec.server.snapshot_gc")


class SnapshotGC:
    def __init__(self, store: SnapshotStore, config: ServerConfig, pinned: Callable[[], set[str]],
                 alive: Callable[[str], bool], default_tenant: str) -> None:
        self.store = store
        self.config = config
        self.pinned = pinned
        self.alive = alive
        self.default_tenant = default_tenant
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def collect(self, tenant: str | None = None, now: float | None = None) -> list[dict]:
        """One pass over the tenant's snapshots (all for None) as of `now` (default: now); what it removed, with
        the reason for each."""
        removed = self.store.collect(time.time() if now is None else now, self.config.snapshot_keep, self.config.snapshot_max_bytes,
                                     self.pinned(), self.alive, tenant, self.default_tenant)
        root = self.store.root
        temporaries = [e.name for e in root.iterdir() if (e / TEMPORARY).exists()] if root.is_dir() else []
        owners = self.store.tenants_of(temporaries, self.default_tenant)
        for name in orphans.sweep_snapshots(root):
            if name in owners and (tenant is None or owners[name] == tenant):
                removed.append({"snapshot_id": name, "reason": "fork_leftover", "size_bytes": 0})
        self.collect_pulled_vm_files(now)
        if removed:
            log.info("snapshot GC removed %d snapshots: %s", len(removed),
                     ", ".join(f"{r['snapshot_id']} ({r['reason']})" for r in removed))
        return removed

    def collect_pulled_vm_files(self, now: float | None = None) -> list[Path]:
        """Remove pulled VM files that neither a snapshot (any tenant's, half-made ones included), a VM template,
        nor a VM sandbox of any server on this home (a dead one's included, until it is re-adopted or reaped)
        names."""
        vm = VmConfig.from_server(self.config)
        users = [*self.store.root.glob(f"*/{DATA}/{SNAPSHOT_META}"), *vm.templates_dir.glob(f"*/{TEMPLATE_META}"),
                 *self.config.run_root.glob(f"*/*/{MACHINE_RECORD}")]
        return collect_pulled(vm.root, users, now)

    def start(self) -> None:
        if self.config.snapshot_gc_interval_s > 0:
            self._thread = threading.Thread(target=self._run, daemon=True, name="dsec-snapshot-gc")
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.config.snapshot_gc_interval_s):
            try:
                self.collect()
            except Exception:  # noqa: BLE001 - the next pass retries; a GC failure must not end the thread
                log.exception("snapshot GC pass failed")

    def stop(self) -> None:
        self._stop.set()
