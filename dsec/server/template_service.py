"""TemplateService and SnapshotGC: gRPC glue over the manager's Templates (templates.py) and SnapshotGC
(snapshot_gc.py). Both act for the caller's tenant only."""

from __future__ import annotations

import grpc

from dsec import wire
from dsec.errors import InvalidSpec
from dsec.models import CollectedSnapshot, ReadyProbe
from dsec.server.auth import Authenticator
from dsec.server.errors import rpc_errors
from dsec.server.manager import SandboxManager
from dsec.v1 import template_pb2 as tpb
from dsec.v1 import template_pb2_grpc as tpb_grpc


class TemplateService(tpb_grpc.TemplateServiceServicer):
    def __init__(self, manager: SandboxManager, auth: Authenticator) -> None:
        self.manager = manager
        self.auth = auth

    @rpc_errors
    def Create(self, request: tpb.CreateTemplateRequest, context: grpc.ServicerContext) -> tpb.TemplateInfo:
        config = self.manager.config
        spec = wire.spec_from_pb(request.spec, config.default_resources, config.default_timeout_s)
        ready = wire.from_pb_as(ReadyProbe, request.ready) if request.HasField("ready") else None
        if request.no_start and request.start:
            raise InvalidSpec("give a start command or no_start, not both")
        start = [] if request.no_start else (list(request.start) or None)
        info = self.manager.templates.create(request.name, spec, start, ready, self.auth.tenant(context))
        return wire.to_pb(info)

    @rpc_errors
    def Get(self, request: tpb.TemplateName, context: grpc.ServicerContext) -> tpb.TemplateInfo:
        return wire.to_pb(self.manager.templates.get(request.name, self.auth.tenant(context)))

    @rpc_errors
    def List(self, request: tpb.ListTemplatesRequest, context: grpc.ServicerContext) -> tpb.ListTemplatesResponse:
        found = self.manager.templates.list(self.auth.tenant(context))
        return tpb.ListTemplatesResponse(templates=[wire.to_pb(t) for t in found])

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
        return tpb.CollectSnapshotsResponse(removed=[wire.to_pb(CollectedSnapshot(**r)) for r in removed])


def add_template_services(server: grpc.Server, manager: SandboxManager, auth: Authenticator) -> None:
    tpb_grpc.add_TemplateServiceServicer_to_server(TemplateService(manager, auth), server)
    tpb_grpc.add_SnapshotGCServicer_to_server(SnapshotGCService(manager, auth), server)
