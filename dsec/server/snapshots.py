"""Snapshots on disk: `$DSEC_HOME/snapshots/<snap-id>/{meta.json,data/}`, listed, deleted, never half-visible.

A snapshot is visible once its `meta.json` exists (written last, atomically). Restores copy what they need out
of `data/` before the new sandbox runs (containers unpack the writable layer, VMs copy their disk overlay and
load the device state at start), so a snapshot can go as soon as no restore is reading it: deleting one that
restores are using hides it at once and removes it when the last of them finishes. Snapshots that fork takes
for itself are deleted when the fork is done, so forking never accumulates disk.

Snapshot GC (`collect`, run by snapshot_gc.py on an interval and on demand) removes what nobody will restore:
snapshots past their `expires_at` (a snapshot's optional ttl_s), and snapshots of sandboxes that are gone beyond a
per-tenant budget (newest kept: at most `keep` of them and `max_bytes` together). It never touches a pinned
snapshot (a template's) nor one a restore is reading.

Each snapshot dir is born (renamed into place) with an `owner` link to its server's run directory, and a fork's
own snapshot with a `temporary` file: when that server dies mid-capture or mid-fork, the next server's start
(`orphans.sweep_snapshots`) removes what it left half-written or temporary.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dsec.errors import SnapshotNotFound

META = "meta.json"
DATA = "data"
OWNER = "owner"  # orphans.SNAPSHOT_OWNER
TEMPORARY = "temporary"  # orphans.SNAPSHOT_TEMPORARY


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


class SnapshotStore:
    def __init__(self, root: Path, owner: Path | None = None) -> None:
        self.root = root
        self.owner = owner  # the server's run directory: whether it is alive says if a half-made snapshot is a leftover
        self._lock = threading.Lock()
        self._readers: dict[str, int] = {}
        self._doomed: set[str] = set()

    def new(self, temporary: bool = False) -> tuple[str, Path]:
        """A fresh snapshot id and its data directory (invisible until `publish`); `temporary`: a fork's own."""
        snapshot_id = "snap-" + secrets.token_hex(8)
        staging = self.root / f".new-{snapshot_id}"
        staging.mkdir(parents=True)
        if self.owner is not None:
            (staging / OWNER).symlink_to(self.owner.resolve())
        if temporary:
            (staging / TEMPORARY).touch()
        os.rename(staging, self.root / snapshot_id)  # never a snapshot dir without its marks
        return snapshot_id, self.root / snapshot_id / DATA  # the driver creates it

    def publish(self, snapshot_id: str, meta: dict) -> None:
        tmp = self.root / snapshot_id / (META + ".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.root / snapshot_id / META)

    def discard(self, snapshot_id: str) -> None:
        """Remove a snapshot that was never published (its capture failed)."""
        shutil.rmtree(self.root / snapshot_id, ignore_errors=True)

    def meta(self, snapshot_id: str, tenant: str | None, default_tenant: str) -> dict:
        if not snapshot_id.startswith("snap-") or "/" in snapshot_id or snapshot_id in (".", ".."):
            raise SnapshotNotFound(f"invalid snapshot id {snapshot_id!r}")
        path = self.root / snapshot_id / META
        with self._lock:
            doomed = snapshot_id in self._doomed
        if doomed or not path.exists():
            raise SnapshotNotFound(f"no snapshot {snapshot_id!r}")
        meta = json.loads(path.read_text())
        if tenant is not None and meta.get("tenant", default_tenant) != tenant:
            raise SnapshotNotFound(f"no snapshot {snapshot_id!r}")  # another tenant's is as good as absent
        return meta

    def list(self, tenant: str | None, default_tenant: str, sandbox_id: str = "") -> list[dict]:
        """Published snapshots the tenant owns (all of them for `tenant=None`), oldest first, with sizes."""
        found: list[dict] = []
        if not self.root.exists():
            return found
        for entry in self.root.iterdir():
            try:
                meta = self.meta(entry.name, tenant, default_tenant)
            except (SnapshotNotFound, OSError, ValueError):
                continue
            if sandbox_id and meta.get("sandbox_id") != sandbox_id:
                continue
            found.append({**meta, "size_bytes": _size(entry / DATA)})
        return sorted(found, key=lambda m: m.get("created_at", 0.0))

    @contextmanager
    def reading(self, snapshot_id: str) -> Iterator[Path]:
        """Hold the snapshot's data for a restore; a delete meanwhile waits for the last reader."""
        with self._lock:
            if snapshot_id in self._doomed:
                raise SnapshotNotFound(f"no snapshot {snapshot_id!r} (deleted)")
            self._readers[snapshot_id] = self._readers.get(snapshot_id, 0) + 1
        try:
            yield self.root / snapshot_id / DATA
        finally:
            with self._lock:
                self._readers[snapshot_id] -= 1
                last = self._readers[snapshot_id] == 0
                if last:
                    del self._readers[snapshot_id]
                remove = last and snapshot_id in self._doomed
                if remove:
                    self._doomed.discard(snapshot_id)
            if remove:
                self._remove(snapshot_id)

    def delete(self, snapshot_id: str) -> None:
        """Hide the snapshot now; its files go now, or when the restores reading it finish."""
        with self._lock:
            if self._readers.get(snapshot_id):
                self._doomed.add(snapshot_id)
                return
        self._remove(snapshot_id)

    def _remove(self, snapshot_id: str) -> None:
        folder = self.root / snapshot_id
        (folder / META).unlink(missing_ok=True)  # invisible first: a crash mid-delete leaves no usable half
        shutil.rmtree(folder, ignore_errors=True)

    def collect(self, now: float, keep: int, max_bytes: int, pinned: set[str], alive: Callable[[str], bool],
                tenant: str | None, default_tenant: str) -> list[dict]:
        """One GC pass over the tenant's snapshots (everyone's for None); returns what it removed, each with
        `snapshot_id`, `reason` (expired | over_count | over_bytes) and `size_bytes`."""
        with self._lock:
            busy = set(self._readers) | self._doomed
        removed: list[dict] = []
        kept_of_gone: dict[str, list[dict]] = {}
        for meta in self.list(tenant, default_tenant):
            if meta["snapshot_id"] in pinned or meta["snapshot_id"] in busy:
                continue
            if meta.get("expires_at") and meta["expires_at"] <= now:
                removed.append({**meta, "reason": "expired"})
            elif not alive(meta.get("sandbox_id", "")):
                kept_of_gone.setdefault(meta.get("tenant", default_tenant), []).append(meta)
        for metas in kept_of_gone.values():
            total = 0
            for index, meta in enumerate(sorted(metas, key=lambda m: m.get("created_at", 0.0), reverse=True)):
                total += meta["size_bytes"]
                if index >= keep:
                    removed.append({**meta, "reason": "over_count"})
                elif total > max_bytes:
                    removed.append({**meta, "reason": "over_bytes"})
        for meta in removed:
            self.delete(meta["snapshot_id"])
        return [{"snapshot_id": m["snapshot_id"], "reason": m["reason"], "size_bytes": m["size_bytes"]} for m in removed]

    def tenants_of(self, names: list[str], default_tenant: str) -> dict[str, str]:
        """The owning tenant of each named snapshot dir that has a readable meta.json (for GC reports)."""
        owners: dict[str, str] = {}
        for name in names:
            try:
                owners[name] = json.loads((self.root / name / META).read_text()).get("tenant", default_tenant)
            except (OSError, ValueError):
                continue
        return owners
