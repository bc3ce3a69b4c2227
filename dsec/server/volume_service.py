"""VolumeService: gRPC glue over the manager's VolumeStore (volumes.py). Volumes belong to the caller's tenant."""

from __future__ import annotations

import grpc

from dsec import models, wire
from dsec.server.auth import Authenticator
from dsec.server.errors import rpc_errors
from dsec.server.volumes import VolumeInfo, VolumeStore
from dsec.v1 import volume_pb2 as vpb
from dsec.v1 import volume_pb2_grpc as vpb_grpc


def volume_to_pb(info: VolumeInfo) -> vpb.VolumeInfo:
    return wire.to_pb(models.VolumeInfo(name=info.name, size_mb=info.size_mb, created_at=info.created_at,
                                        mode=info.mode, holders=list(info.holders)))


class VolumeService(vpb_grpc.VolumeServiceServicer):
    def __init__(self, store: VolumeStore, auth: Authenticator) -> None:
        self.store = store
        self.auth = auth

    @rpc_errors
    def Create(self, request: vpb.CreateVolumeRequest, context: grpc.ServicerContext) -> vpb.VolumeInfo:
        return volume_to_pb(self.store.create(request.name, int(request.size_mb), self.auth.tenant(context)))

    @rpc_errors
    def Get(self, request: vpb.VolumeName, context: grpc.ServicerContext) -> vpb.VolumeInfo:
        return volume_to_pb(self.store.get(request.name, self.auth.tenant(context)))

    @rpc_errors
    def List(self, request: vpb.ListVolumesRequest, context: grpc.ServicerContext) -> vpb.ListVolumesResponse:
        return vpb.ListVolumesResponse(volumes=[volume_to_pb(v) for v in self.store.list(self.auth.tenant(context))])

    @rpc_errors
    def Delete(self, request: vpb.VolumeName, context: grpc.ServicerContext) -> vpb.DeleteVolumeResponse:
        self.store.delete(request.name, self.auth.tenant(context))
        return vpb.DeleteVolumeResponse()


def add_volume_service(server: grpc.Server, store: VolumeStore, auth: Authenticator) -> None:
    vpb_grpc.add_VolumeServiceServicer_to_server(VolumeService(store, auth), server)
