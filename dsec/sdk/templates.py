"""`client.templates`: ready templates (docs/lifecycle.md) — an image whose start command ran and whose readiness
probe passed, snapshotted once; `client.create(template=name)` starts from that snapshot and returns only once the
probe passes again. Also the on-demand snapshot GC pass (`client.snapshots_gc()`).

Returns pydantic models (dsec.models.TemplateInfo, CollectedSnapshot), converted from the wire by dsec/wire.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError

from dsec import wire
from dsec.errors import InvalidSpec
from dsec.models import CollectedSnapshot, ReadyProbe, SandboxSpec, TemplateInfo
from dsec.v1 import template_pb2 as tpb
from dsec.v1 import template_pb2_grpc as tpb_grpc

if TYPE_CHECKING:
    from dsec.sdk.client import Client


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


class Templates:
    def __init__(self, client: Client) -> None:
        self.client = client
        self._stub = tpb_grpc.TemplateServiceStub(client.channel)

    def create(
        self,
        name: str,
        *,
        image: str,
        substrate: str = "container",
        start: list[str] | None = None,
        ready: ReadyProbe | dict | None = None,
        driver: str = "",
        cpu: float | None = None,
        memory_mb: int | None = None,
        pids: int | None = None,
        disk_mb: int | None = None,
        env: dict[str, str] | None = None,
        network: bool = False,
        network_allow: list[str] | None = None,
    ) -> TemplateInfo:
        """Build a template: start `image`, run `start` (None = the image's start-command label, [] = none) as a
        long-lived process, wait for `ready` (ReadyProbe: `{"command": [...]}` exits 0 or `{"tcp_port": N}`
        connects), snapshot, destroy the builder. TemplateExists if the name is taken; SandboxNotReady if the
        probe never passed (nothing is left behind)."""
        resources = {k: v for k, v in {"cpu": cpu, "memory_mb": memory_mb, "pids": pids, "disk_mb": disk_mb}.items()
                     if v is not None}
        try:
            spec = SandboxSpec(image=image, substrate=substrate, driver=driver, resources=resources,  # type: ignore[arg-type]
                               env=env or {}, network=network, network_allow=network_allow or [])
            probe = ReadyProbe.model_validate(ready) if isinstance(ready, dict) else ready
        except ValidationError as exc:
            raise InvalidSpec(f"invalid template: {_problems(exc)}") from None
        request = tpb.CreateTemplateRequest(
            name=name,
            spec=wire.spec_to_pb(spec, leave_defaults_to_server=True),
            start=start or [], no_start=start is not None and not start,
            ready=wire.to_pb(probe) if probe is not None else None,
        )
        return wire.from_pb_as(TemplateInfo, self.client.rpc(self._stub.Create, request))

    def get(self, name: str) -> TemplateInfo:
        return wire.from_pb_as(TemplateInfo, self.client.rpc(self._stub.Get, tpb.TemplateName(name=name)))

    def list(self) -> list[TemplateInfo]:
        return [wire.from_pb_as(TemplateInfo, t) for t in self.client.rpc(self._stub.List, tpb.ListTemplatesRequest()).templates]

    def delete(self, name: str) -> None:
        """Forget the template and free its snapshot; sandboxes already started from it live on."""
        self.client.rpc(self._stub.Delete, tpb.TemplateName(name=name))


def collect_snapshots(client: Client) -> list[CollectedSnapshot]:
    reply = client.rpc(tpb_grpc.SnapshotGCStub(client.channel).Collect, tpb.CollectSnapshotsRequest())
    return [wire.from_pb_as(CollectedSnapshot, r) for r in reply.removed]
