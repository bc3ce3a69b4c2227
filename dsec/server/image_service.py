"""The ImageService servicer: thin gRPC glue over the node's LayerStore.

Paths in requests name files on the server's machine (the store is node-local); store errors are DsecErrors,
turned into typed statuses by `rpc_errors`.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from dsec.errors import InvalidSpec
from dsec.images.store import ImageRecord, LayerStore
from dsec.server.errors import rpc_errors
from dsec.v1 import image_pb2 as pb
from dsec.v1 import image_pb2_grpc as pb_grpc

FORMATS = ("oci", "docker-archive")


def image_to_pb(record: ImageRecord) -> pb.Image:
    cfg = record.config
    return pb.Image(
        digest=record.digest,
        tags=record.tags,
        config_digest=record.config_digest,
        layers=[pb.ImageLayer(blob_digest=l.blob_digest, diff_id=l.diff_id, media_type=l.media_type, size=l.size)
                for l in record.layers],
        size=record.size,
        created=record.created,
        last_used=record.last_used,
        config=pb.ImageRuntimeConfig(env=cfg.env, cmd=cfg.cmd, entrypoint=cfg.entrypoint, workdir=cfg.workdir, user=cfg.user),
        holders=record.holders,
    )


def detect_format(path: Path) -> str:
    """`oci` for a layout directory, `docker-archive` for a file; anything else is a typed error."""
    if path.is_dir():
        return "oci"
    if path.is_file():
        return "docker-archive"
    raise InvalidSpec(f"image import path {str(path)!r} does not exist on the server's machine")


class ImageService(pb_grpc.ImageServiceServicer):
    def __init__(self, store: LayerStore) -> None:
        self.store = store

    @rpc_errors
    def Import(self, request: pb.ImportImageRequest, context: grpc.ServicerContext) -> pb.Image:
        if not request.path:
            raise InvalidSpec("Import needs a path (an OCI layout directory or a docker-save tar on the server)")
        path = Path(request.path)
        fmt = request.format or detect_format(path)
        if fmt not in FORMATS:
            raise InvalidSpec(f"unknown image format {fmt!r}: use one of {', '.join(FORMATS)}")
        tag = request.tag or None
        if fmt == "oci":
            return image_to_pb(self.store.import_oci_layout(path, tag=tag))
        return image_to_pb(self.store.import_docker_archive(path, tag=tag))

    @rpc_errors
    def List(self, request: pb.ListImagesRequest, context: grpc.ServicerContext) -> pb.ListImagesResponse:
        return pb.ListImagesResponse(images=[image_to_pb(r) for r in self.store.list()])

    @rpc_errors
    def Inspect(self, request: pb.ImageRef, context: grpc.ServicerContext) -> pb.Image:
        return image_to_pb(self.store.inspect(request.ref))

    @rpc_errors
    def Remove(self, request: pb.ImageRef, context: grpc.ServicerContext) -> pb.RemoveImageResponse:
        return pb.RemoveImageResponse(removed=self.store.remove(request.ref))

    @rpc_errors
    def Tag(self, request: pb.TagImageRequest, context: grpc.ServicerContext) -> pb.Image:
        return image_to_pb(self.store.tag(request.ref, request.new_tag))


def add_image_service(server: grpc.Server, store: LayerStore) -> None:
    """Register the ImageService on `server` (called by dsec.server.main.serve)."""
    pb_grpc.add_ImageServiceServicer_to_server(ImageService(store), server)
