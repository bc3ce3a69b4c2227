"""`client.volumes`: named volumes (docs/lifecycle.md) — an ext4 filesystem of `size_mb` that outlives sandboxes
and server restarts. Mount one at create: read-write in one sandbox, or read-only in many."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dsec.v1 import volume_pb2 as vpb
from dsec.v1 import volume_pb2_grpc as vpb_grpc

if TYPE_CHECKING:
    from dsec.sdk.client import Client


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    size_mb: int  # the quota: writing past it is ENOSPC inside the sandbox
    created_at: float
    mode: str  # "" (not mounted) | "rw" | "ro"
    holders: list[str]  # ids of the sandboxes it is mounted in now

    @classmethod
    def from_pb(cls, info: vpb.VolumeInfo) -> VolumeInfo:
        return cls(info.name, info.size_mb, info.created_at, info.mode, list(info.holders))


class Volumes:
    def __init__(self, client: Client) -> None:
        self.client = client
        self._stub = vpb_grpc.VolumeServiceStub(client.channel)

    def create(self, name: str, size_mb: int) -> VolumeInfo:
        """A new empty volume; VolumeExists if the name is taken, InvalidSpec for a bad name or size."""
        return VolumeInfo.from_pb(self.client.rpc(self._stub.Create, vpb.CreateVolumeRequest(name=name, size_mb=size_mb)))

    def get(self, name: str) -> VolumeInfo:
        return VolumeInfo.from_pb(self.client.rpc(self._stub.Get, vpb.VolumeName(name=name)))

    def list(self) -> list[VolumeInfo]:
        return [VolumeInfo.from_pb(v) for v in self.client.rpc(self._stub.List, vpb.ListVolumesRequest()).volumes]

    def delete(self, name: str) -> None:
        """Delete it and its files; VolumeInUse while a sandbox has it mounted."""
        self.client.rpc(self._stub.Delete, vpb.VolumeName(name=name))
