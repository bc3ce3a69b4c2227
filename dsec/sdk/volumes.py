"""`client.volumes`: named volumes (docs/lifecycle.md) — an ext4 filesystem of `size_mb` that outlives sandboxes
and server restarts. Mount one at create: read-write in one sandbox, or read-only in many."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsec import wire
from dsec.models import VolumeInfo
from dsec.v1 import volume_pb2 as vpb
from dsec.v1 import volume_pb2_grpc as vpb_grpc

if TYPE_CHECKING:
    from dsec.sdk.client import Client


class Volumes:
    def __init__(self, client: Client) -> None:
        self.client = client
        self._stub = vpb_grpc.VolumeServiceStub(client.channel)

    def create(self, name: str, size_mb: int) -> VolumeInfo:
        """A new empty volume; VolumeExists if the name is taken, InvalidSpec for a bad name or size."""
        return wire.from_pb_as(VolumeInfo, self.client.rpc(self._stub.Create, vpb.CreateVolumeRequest(name=name, size_mb=size_mb)))

    def get(self, name: str) -> VolumeInfo:
        return wire.from_pb_as(VolumeInfo, self.client.rpc(self._stub.Get, vpb.VolumeName(name=name)))

    def list(self) -> list[VolumeInfo]:
        return [wire.from_pb_as(VolumeInfo, v) for v in self.client.rpc(self._stub.List, vpb.ListVolumesRequest()).volumes]

    def delete(self, name: str) -> None:
        """Delete it and its files; VolumeInUse while a sandbox has it mounted."""
        self.client.rpc(self._stub.Delete, vpb.VolumeName(name=name))
