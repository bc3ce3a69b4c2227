"""SDK helpers for the ImageService: `Images(client).build(...)`, `.pull(...)`, `.ls()` and friends.

Paths name files on the server's machine (the image store is node-local); errors arrive as dsec exceptions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsec import wire
from dsec.models import BuildResult, DiskUsage, ImageInfo, PruneResult
from dsec.v1 import image_pb2 as pb
from dsec.v1 import image_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from dsec.sdk.client import Client


class Images:
    """The server's image store, over the client's channel."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.stub = pb_grpc.ImageServiceStub(client.channel)

    def import_(self, path: str, format: str = "", tag: str = "") -> ImageInfo:
        reply = self.client.rpc(self.stub.Import, pb.ImportImageRequest(path=path, format=format, tag=tag))
        return wire.from_pb_as(ImageInfo, reply)

    def ls(self) -> list[ImageInfo]:
        return [wire.from_pb_as(ImageInfo, image) for image in self.client.rpc(self.stub.List, pb.ListImagesRequest()).images]

    def inspect(self, ref: str) -> ImageInfo:
        return wire.from_pb_as(ImageInfo, self.client.rpc(self.stub.Inspect, pb.ImageRef(ref=ref)))

    def rm(self, ref: str) -> list[str]:
        return list(self.client.rpc(self.stub.Remove, pb.ImageRef(ref=ref)).removed)

    def tag(self, ref: str, new_tag: str) -> ImageInfo:
        return wire.from_pb_as(ImageInfo, self.client.rpc(self.stub.Tag, pb.TagImageRequest(ref=ref, new_tag=new_tag)))

    def build(self, dockerfile: str, tag: str = "", context_dir: str = "", timeout: float | None = None) -> BuildResult:
        request = pb.BuildImageRequest(dockerfile=dockerfile, tag=tag, context_dir=context_dir)
        return wire.from_pb_as(BuildResult, self.client.rpc(self.stub.Build, request, timeout=timeout))

    def export(self, ref: str, path: str, format: str = "oci") -> str:
        return self.client.rpc(self.stub.Export, pb.ExportImageRequest(ref=ref, path=path, format=format)).path

    def pull(self, ref: str, tag: str = "", eager: bool = False) -> ImageInfo:
        return wire.from_pb_as(ImageInfo, self.client.rpc(self.stub.Pull, pb.PullImageRequest(ref=ref, tag=tag, eager=eager)))

    def push(self, ref: str, dest: str) -> str:
        return self.client.rpc(self.stub.Push, pb.PushImageRequest(ref=ref, dest=dest)).digest

    def prune(self, budget_bytes: int = 0) -> PruneResult:
        return wire.from_pb_as(PruneResult, self.client.rpc(self.stub.Prune, pb.PruneRequest(budget_bytes=budget_bytes)))

    def du(self) -> DiskUsage:
        return wire.from_pb_as(DiskUsage, self.client.rpc(self.stub.DiskUsage, pb.DiskUsageRequest()))
