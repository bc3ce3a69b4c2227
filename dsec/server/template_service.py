"""TemplateService and SnapshotGC: gRPC glue over the manager's Templates (templates.py) and SnapshotGC
(snapshot_gc.py). Both act for the caller's tenant only."""

from __future__ import annotations

import grpc
from pydantic import ValidationError

from dsec import wire
from dsec.errors import InvalidSpec
from dsec.models import ReadyProbe, TemplateInfo
from dsec.server.auth import Authenticator
from dsec.server.errors import rpc_errors
from dsec.server.manager import SandboxManager
from dsec.v1 import sandbox_pb2 as pb
from dsec.v1 import template_pb2 as tpb
from dsec.v1 import template_pb2_grpc as tpb_grpc


def probe_from_pb(message: pb.ReadyProbe) -> ReadyProbe:
    """Zeros take the defaults; pydantic's ValidationError for a bad probe."""
    fields: dict = {"command": list(message.command), "tcp_port": message.tcp_port}
    fields |= {k: v for k, v in (("interval_s", message.interval_s), ("timeout_s", message.timeout_s)) if v}
    return ReadyProbe(**fields)


def probe_to_pb(probe: ReadyProbe | None) -> pb.ReadyProbe | None:
    return None if probe is None else pb.ReadyProbe(**probe.model_dump())


def template_to_pb(info: TemplateInfo) -> tpb.TemplateInfo:
    return tpb.TemplateInfo(
        name=info.name, image=info.image, image_digest=info.image_digest, substrate=info.substrate,
        driver=info.driver, resources=pb.Resources(**info.resources.model_dump()), start=info.start,
        ready=probe_to_pb(info.ready), snapshot_id=info.snapshot_id, snapshot_kind=info.snapshot_kind,
        created_at=info.created_at, build_ms=info.build_ms,
    )


class TemplateService(tpb_grpc.TemplateServiceServicer):
    def __init__(self, manager: SandboxManager, auth: Authenticator) -> None:
        self.manager = manager
        self.auth = auth

    @rpc_errors
    def Create(self, request: tpb.CreateTemplateRequest, context: grpc.ServicerContext) -> tpb.TemplateInfo:
        config = self.manager.config
        spec = wire.spec_from_pb(request.spec, config.default_resources, config.default_timeout_s)
        try:
            ready = probe_from_pb(request.ready) if request.HasField("ready") else None
        except ValidationError as exc:
            raise InvalidSpec(f"invalid readiness probe: {exc.errors()[0]['msg']}") from None
        if request.no_start and request.start:
            raise InvalidSpec("give a start command or no_start, not both")
        start = [] if request.no_start else (list(request.start) or None)
        info = self.manager.templates.create(request.name, spec, start, ready, self.auth.tenant(context))
        return template_to_pb(info)

    @rpc_errors
    def Get(self, request: tpb.TemplateName, context: grpc.ServicerContext) -> tpb.TemplateInfo:
        return template_to_pb(self.manager.templates.get(request.name, self.auth.tenant(context)))

    @rpc_errors
    def List(self, request: tpb.ListTemplatesRequest, context: grpc.ServicerContext) -> tpb.ListTemplatesResponse:
        found = self.manager.templates.list(self.auth.tenant(context))
        return tpb.ListTemplatesResponse(templates=[template_to_pb(t) for t in found])

    @rpc_errors
    def Delete(self, request: tpb.TemplateName, context: grpc.ServicerContext) -> tpb.DeleteTemplateResponse:
        self.manager.templates.delete(request.name, self.auth.tenant(context))
        return tpb.DeleteTemplateResponse()


class SnapshotGCService(tpb_grpc.SnapshotGCServicer):
    def __init__(self, manager: SandboxManager, auth: Authenticator) -> None:
        self.manager = manager
        self.auth = auth

    @rpc_errors
    def Collect(self, request: tpb.CollectSnapshotsRequest, context: grpc.ServicerContext) -> tpb.CollectSnapshotsResponse:
        removed = self.manager.snapshot_gc.collect(self.auth.tenant(context))
        return tpb.CollectSnapshotsResponse(removed=[tpb.CollectedSnapshot(**r) for r in removed])


def add_template_services(server: grpc.Server, manager: SandboxManager, auth: Authenticator) -> None:
    tpb_grpc.add_TemplateServiceServicer_to_server(TemplateService(manager, auth), server)
    tpb_grpc.add_SnapshotGCServicer_to_server(SnapshotGCService(manager, auth), server)
