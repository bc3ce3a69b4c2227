"""SnapshotRegistry: gRPC glue over snapshot_artifacts.py. A caller pushes only its own snapshots; a pulled
snapshot belongs to the caller's tenant."""

from __future__ import annotations

import grpc

from dsec import wire
from dsec.errors import InvalidSpec
from dsec.images.store import LayerStore
from dsec.models import SnapshotInfo
from dsec.server import snapshot_artifacts
from dsec.server.auth import DEFAULT_TENANT, Authenticator
from dsec.server.errors import rpc_errors
from dsec.server.manager import SandboxManager
from dsec.substrates.vm.config import VmConfig
from dsec.v1 import sandbox_pb2 as pb
from dsec.v1 import snapshot_registry_pb2 as spb
from dsec.v1 import snapshot_registry_pb2_grpc as spb_grpc


class SnapshotRegistryService(spb_grpc.SnapshotRegistryServicer):
    def __init__(self, manager: SandboxManager, auth: Authenticator) -> None:
        self.manager = manager
        self.auth = auth

    def _images(self) -> LayerStore:
        if self.manager.images is None:
            raise InvalidSpec("this server has no image store configured: it cannot push or pull snapshots")
        return self.manager.images

    @rpc_errors
    def Push(self, request: spb.PushSnapshotRequest, context: grpc.ServicerContext) -> spb.PushSnapshotResponse:
        meta = self.manager.snapshots.meta(request.snapshot_id, self.auth.tenant(context), DEFAULT_TENANT)
        done = snapshot_artifacts.push(self.manager.snapshots, self._images(), meta, request.ref)
        return wire.to_pb(done)

    @rpc_errors
    def Pull(self, request: spb.PullSnapshotRequest, context: grpc.ServicerContext) -> pb.SnapshotRef:
        tenant = self.auth.tenant(context)
        vm_root = VmConfig.from_server(self.manager.config).root
        meta = snapshot_artifacts.pull(self.manager.snapshots, self._images(), request.ref, tenant, vm_root)
        listed = [m for m in self.manager.list_snapshots(tenant) if m["snapshot_id"] == meta["snapshot_id"]]
        info = listed[0] if listed else meta
        return wire.to_pb(SnapshotInfo(**{k: v for k, v in info.items() if k in SnapshotInfo.model_fields}))


def add_snapshot_registry_service(server: grpc.Server, manager: SandboxManager, auth: Authenticator) -> None:
    spb_grpc.add_SnapshotRegistryServicer_to_server(SnapshotRegistryService(manager, auth), server)
