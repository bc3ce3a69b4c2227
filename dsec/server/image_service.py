"""The ImageService servicer: thin gRPC glue over the node's LayerStore.

Paths in requests name files on the server's machine (the store is node-local); store errors are DsecErrors,
turned into typed statuses by `rpc_errors`.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from dsec import wire
from dsec.config import ServerConfig
from dsec.errors import InvalidSpec
from dsec.images import gc, registry
from dsec.images.build import RUN_DRIVER, RunDriver, build, parse_dockerfile
from dsec.images.export import export_docker_archive, export_oci_layout
from dsec.images.store import ImageRecord, LayerStore
from dsec.models import DiskUsage, ImageConfig, ImageInfo, ImageLayer, PruneResult
from dsec.server.drivers import DriverRegistry
from dsec.server.errors import rpc_errors
from dsec.v1 import image_pb2 as pb
from dsec.v1 import image_pb2_grpc as pb_grpc

FORMATS = ("oci", "docker-archive")


def image_to_pb(record: ImageRecord) -> pb.Image:
    cfg = record.config
    return wire.to_pb(ImageInfo(
        digest=record.digest, tags=record.tags, config_digest=record.config_digest,
        layers=[ImageLayer(blob_digest=layer.blob_digest, diff_id=layer.diff_id, media_type=layer.media_type,
                           size_bytes=layer.size) for layer in record.layers],
        size_bytes=record.size, created_at=record.created, last_used_at=record.last_used,
        config=ImageConfig(env=cfg.env, cmd=cfg.cmd, entrypoint=cfg.entrypoint, workdir=cfg.workdir, user=cfg.user),
        holders=record.holders,
    ))  # fmt: skip


def detect_format(path: Path) -> str:
    """`oci` for a layout directory, `docker-archive` for a file; anything else is a typed error."""
    if path.is_dir():
        return "oci"
    if path.is_file():
        return "docker-archive"
    raise InvalidSpec(f"image import path {str(path)!r} does not exist on the server's machine")


def _run_driver() -> RunDriver:
    """The driver a RUN build step runs in (images/ cannot pick one: it sits below the substrates)."""
    return DriverRegistry(ServerConfig()).get(RUN_DRIVER)


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

    @rpc_errors
    def Build(self, request: pb.BuildImageRequest, context: grpc.ServicerContext) -> pb.BuildImageResponse:
        ctx = Path(request.context_dir) if request.context_dir else None
        result = build(self.store, parse_dockerfile(request.dockerfile), tag=request.tag or None, context=ctx,
                       run_driver=_run_driver)
        return pb.BuildImageResponse(image=image_to_pb(result.record), steps_cached=result.steps_cached,
                                     steps_run=result.steps_run)

    @rpc_errors
    def Export(self, request: pb.ExportImageRequest, context: grpc.ServicerContext) -> pb.ExportImageResponse:
        if not request.path:
            raise InvalidSpec("Export needs a destination path on the server's machine")
        fmt = request.format or "oci"
        if fmt == "oci":
            return pb.ExportImageResponse(path=str(export_oci_layout(self.store, request.ref, Path(request.path))))
        if fmt == "docker-archive":
            return pb.ExportImageResponse(path=str(export_docker_archive(self.store, request.ref, Path(request.path))))
        raise InvalidSpec(f"unknown image format {fmt!r}: use one of {', '.join(FORMATS)}")

    @rpc_errors
    def Pull(self, request: pb.PullImageRequest, context: grpc.ServicerContext) -> pb.Image:
        return image_to_pb(registry.pull(self.store, request.ref, tag=request.tag or None, lazy=not request.eager))

    @rpc_errors
    def Push(self, request: pb.PushImageRequest, context: grpc.ServicerContext) -> pb.PushImageResponse:
        return pb.PushImageResponse(digest=registry.push(self.store, request.ref, request.dest))

    @rpc_errors
    def Prune(self, request: pb.PruneRequest, context: grpc.ServicerContext) -> pb.PruneResponse:
        if request.budget_bytes < 0:
            raise InvalidSpec("budget_bytes must be >= 0 (0 = no budget)")
        result = gc.prune(self.store, budget_bytes=request.budget_bytes or None)
        return wire.to_pb(PruneResult(images_removed=result.images_removed, layers_removed=result.layers_removed,
                                      bytes_freed=result.bytes_freed))

    @rpc_errors
    def DiskUsage(self, request: pb.DiskUsageRequest, context: grpc.ServicerContext) -> pb.DiskUsageResponse:
        du = gc.disk_usage(self.store)
        return wire.to_pb(DiskUsage(images=du.images, layers=du.layers, layer_bytes=du.layer_bytes,
                                    blob_bytes=du.blob_bytes, partial_bytes=du.partial_bytes, held_images=du.held_images))


def add_image_service(server: grpc.Server, store: LayerStore) -> None:
    """Register the ImageService on `server` (called by dsec.server.main.serve)."""
    pb_grpc.add_ImageServiceServicer_to_server(ImageService(store), server)
