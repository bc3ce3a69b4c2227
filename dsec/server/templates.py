"""Ready templates: an image + start command + readiness probe, started once, waited on, and snapshotted.

Why: a service that takes seconds to start (a kernel server, a database, a warmed-up model) should start once,
not on every create. Building a template starts a builder sandbox, runs the start command as a long-lived
process, waits for the probe, snapshots it (`manager.snapshot` picks the richest kind the driver has:
memory+disk for VMs, files for containers) and destroys the builder. A create naming the template restores
that snapshot, re-runs the start command when the snapshot holds no memory (no running service came with
it), and returns only once the probe passes again.

Templates are tenant-scoped and kept in one small JSON index, `$DSEC_HOME/templates/index.json`, written
atomically under a file lock (servers on one machine share `$DSEC_HOME`), so they survive server restarts.
A template's snapshot is pinned: the snapshot GC never collects it and deleting it directly is refused; it
goes with its template.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from dsec.errors import DsecError, InvalidSpec, TemplateExists, TemplateNotFound
from dsec.models import TEMPLATE_NAME, ReadyProbe, SandboxSpec, TemplateInfo
from dsec.server.auth import DEFAULT_TENANT
from dsec.server.readiness import make_ready

if TYPE_CHECKING:
    from dsec.server.manager import ManagedSandbox, SandboxManager

BUILDER_LABEL = "dsec.template-builder"


def _check_name(name: str) -> None:
    if not (1 <= len(name) <= 63 and re.match(TEMPLATE_NAME, name)):
        raise InvalidSpec(f"template name must be 1-63 of a-z 0-9 _ . - starting with a letter or digit, got {name!r}")


class TemplateIndex:
    """`{tenant: {name: TemplateInfo}}` on disk; every change is read-modify-write under an exclusive flock."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "index.json"

    @contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, dict]]]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = json.loads(self.path.read_text()) if self.path.exists() else {}
            before = json.dumps(data, sort_keys=True)
            yield data
            if json.dumps(data, sort_keys=True) != before:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
                os.replace(tmp, self.path)

    def get(self, tenant: str, name: str) -> TemplateInfo:
        with self._locked() as data:
            record = data.get(tenant, {}).get(name)
        if record is None:
            raise TemplateNotFound(f"no template {name!r}; create it with client.templates.create", name=name)
        return TemplateInfo.model_validate(record)

    def list(self, tenant: str | None) -> list[TemplateInfo]:
        """The tenant's templates (everyone's for None), oldest first."""
        with self._locked() as data:
            records = [r for t, named in data.items() if tenant is None or t == tenant for r in named.values()]
        return sorted((TemplateInfo.model_validate(r) for r in records), key=lambda t: t.created_at)

    def add(self, tenant: str, info: TemplateInfo) -> None:
        with self._locked() as data:
            if info.name in data.get(tenant, {}):
                raise TemplateExists(f"template {info.name!r} exists; delete it first", name=info.name)
            data.setdefault(tenant, {})[info.name] = info.model_dump(mode="json")

    def remove(self, tenant: str, name: str) -> TemplateInfo:
        with self._locked() as data:
            record = data.get(tenant, {}).pop(name, None)
            if record is not None and not data[tenant]:
                del data[tenant]
        if record is None:
            raise TemplateNotFound(f"no template {name!r}", name=name)
        return TemplateInfo.model_validate(record)

    def pinned(self) -> set[str]:
        """Snapshot ids some template (of any tenant, on any server sharing this home) stands on."""
        return {t.snapshot_id for t in self.list(None)}


class Templates:
    """Build, start from, list and delete templates on one server (the manager's `templates`)."""

    def __init__(self, manager: SandboxManager, folder: Path) -> None:
        self.manager = manager
        self.index = TemplateIndex(folder)
        self._lock = threading.Lock()
        self._building: set[tuple[str, str]] = set()  # (tenant, name) under way here: a second build fails fast

    def create(self, name: str, spec: SandboxSpec, start: list[str] | None, ready: ReadyProbe | None,
               tenant: str = DEFAULT_TENANT) -> TemplateInfo:
        """Build template `name` from `spec`; `start` None = the image's start command label, [] = none."""
        _check_name(name)
        if spec.template or spec.ready is not None or spec.volumes:
            raise InvalidSpec("a template's spec names no template, ready probe or volumes (pass ready= itself)")
        key = (tenant, name)
        with self._lock:
            if key in self._building:
                raise TemplateExists(f"template {name!r} is being built", name=name)
            self._building.add(key)
        try:
            self._exists_not(tenant, name)
            return self._build(name, spec, start, ready, tenant)
        finally:
            with self._lock:
                self._building.discard(key)

    def _exists_not(self, tenant: str, name: str) -> None:
        try:
            self.index.get(tenant, name)
        except TemplateNotFound:
            return
        raise TemplateExists(f"template {name!r} exists; delete it first", name=name)

    def _build(self, name: str, spec: SandboxSpec, start: list[str] | None, ready: ReadyProbe | None,
               tenant: str) -> TemplateInfo:
        began = time.monotonic()
        builder = self.manager.create(spec.model_copy(update={"labels": spec.labels | {BUILDER_LABEL: name}}), tenant)
        snapshot_id = ""
        try:
            argv = list(builder.image.config.start_command) if start is None else list(start)
            make_ready(builder, argv, ready)
            meta = self.manager.snapshot(builder.sandbox_id, f"template:{name}", tenant)
            snapshot_id = meta["snapshot_id"]
            info = TemplateInfo(
                name=name, image=spec.image, image_digest=builder.image.digest, substrate=spec.substrate,
                driver=builder.driver_name, resources=spec.resources, start=argv, ready=ready,
                snapshot_id=snapshot_id, snapshot_kind=meta["kind"], created_at=time.time(),
                build_ms=(time.monotonic() - began) * 1000,
            )
            self.index.add(tenant, info)  # before the builder goes: from here on the GC sees the pin
        except BaseException:
            if snapshot_id:
                self.manager.snapshots.delete(snapshot_id)
            raise
        finally:
            self._destroy(builder)
        return info

    def launch(self, spec: SandboxSpec, tenant: str) -> ManagedSandbox:
        """A sandbox from template `spec.template`, returned once ready. The template fixes image, substrate,
        driver, resources and network; `spec` adds env and labels and sets timeouts and workdir."""
        info = self.index.get(tenant, spec.template)
        if spec.volumes:
            raise InvalidSpec("volumes cannot be mounted into a sandbox started from a template (not supported yet)")
        meta = self.manager.snapshots.meta(info.snapshot_id, tenant, DEFAULT_TENANT)
        try:
            built = SandboxSpec.model_validate(meta["spec"])
        except ValidationError as exc:  # a snapshot written by an older server that this one cannot read
            raise InvalidSpec(f"template {info.name!r} has an unreadable snapshot spec: {exc}") from None
        labels = {k: v for k, v in built.labels.items() if k != BUILDER_LABEL} | spec.labels
        restored = built.model_copy(update={
            "image": meta["image"], "env": built.env | spec.env, "labels": labels, "timeout_s": spec.timeout_s,
            "on_timeout": spec.on_timeout, "idle_timeout_s": spec.idle_timeout_s,
            "workdir": spec.workdir or built.workdir, "template": info.name, "ready": spec.ready or info.ready,
        })
        sandbox = self.manager.launch_snapshot(info.snapshot_id, restored, tenant)
        has_memory = "memory" in info.snapshot_kind  # the service came back running with the memory
        self.ready_or_destroy(sandbox, [] if has_memory else info.start, restored.ready)
        return sandbox

    def ready_or_destroy(self, sandbox: ManagedSandbox, start: list[str], ready: ReadyProbe | None) -> None:
        """make_ready, and on any failure destroy the half-made sandbox before the error goes to the caller."""
        if not start and ready is None:
            return
        try:
            make_ready(sandbox, start, ready)
        except BaseException:
            self._destroy(sandbox, detail="its readiness probe did not pass")
            raise

    def _destroy(self, sandbox: ManagedSandbox, detail: str = "template builder done") -> None:
        try:
            self.manager.destroy(sandbox.sandbox_id, detail=detail)
        except DsecError:
            pass  # already ended (its timeout, a shutdown)

    def get(self, name: str, tenant: str = DEFAULT_TENANT) -> TemplateInfo:
        return self.index.get(tenant, name)

    def list(self, tenant: str = DEFAULT_TENANT) -> list[TemplateInfo]:
        return self.index.list(tenant)

    def delete(self, name: str, tenant: str = DEFAULT_TENANT) -> None:
        """Forget the template and delete its snapshot (once restores reading it finish)."""
        info = self.index.remove(tenant, name)
        self.manager.snapshots.delete(info.snapshot_id)
