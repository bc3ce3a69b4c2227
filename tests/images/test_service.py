"""ImageService over a real gRPC server: import, list, inspect, tag, remove, typed errors."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from dsec.errors import ERROR_METADATA_KEY
from dsec.images.store import LayerStore
from dsec.server.image_service import add_image_service
from dsec.v1 import image_pb2 as pb
from dsec.v1 import image_pb2_grpc as pb_grpc
from .layers import Entry, docker_archive, layer_tar, oci_layout

LAYER = layer_tar([Entry("hello", b"world")])


@pytest.fixture
def stub(store: LayerStore) -> Iterator[pb_grpc.ImageServiceStub]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    add_image_service(server, store)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.ImageServiceStub(channel)
    finally:
        channel.close()
        server.stop(grace=None).wait(10)


def _error_name(err: grpc.RpcError) -> str:
    return dict(err.trailing_metadata() or ()).get(ERROR_METADATA_KEY, "")


@pytest.mark.timeout(60)
def test_import_list_inspect_tag_remove(stub: pb_grpc.ImageServiceStub, tmp_path: Path) -> None:
    image = stub.Import(pb.ImportImageRequest(path=str(oci_layout(tmp_path / "l", [LAYER], cmd=["cat", "hello"])), tag="svc"))
    assert image.tags == ["svc"] and len(image.layers) == 1 and list(image.config.cmd) == ["cat", "hello"]
    archive = docker_archive(tmp_path / "a.tar", [LAYER], ["from-docker:1"])
    other = stub.Import(pb.ImportImageRequest(path=str(archive), format="docker-archive"))
    assert other.tags == ["from-docker:1"]
    assert {i.digest for i in stub.List(pb.ListImagesRequest()).images} == {image.digest, other.digest}
    assert stub.Inspect(pb.ImageRef(ref="svc")).digest == image.digest
    assert "svc2" in stub.Tag(pb.TagImageRequest(ref="svc", new_tag="svc2")).tags
    assert list(stub.Remove(pb.ImageRef(ref=image.digest)).removed) == [image.digest]
    assert [i.digest for i in stub.List(pb.ListImagesRequest()).images] == [other.digest]


@pytest.mark.timeout(60)
def test_typed_errors(stub: pb_grpc.ImageServiceStub, tmp_path: Path) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Inspect(pb.ImageRef(ref="missing"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and _error_name(err.value) == "ImageNotFound"
    with pytest.raises(grpc.RpcError) as err:
        stub.Import(pb.ImportImageRequest(path=str(tmp_path / "nowhere")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and _error_name(err.value) == "InvalidSpec"
    with pytest.raises(grpc.RpcError) as err:
        stub.Import(pb.ImportImageRequest(path=str(tmp_path), format="qcow2"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.timeout(60)
def test_export_prune_disk_usage(stub: pb_grpc.ImageServiceStub, tmp_path: Path) -> None:
    image = stub.Import(pb.ImportImageRequest(path=str(oci_layout(tmp_path / "l", [LAYER])), tag="e"))
    out = stub.Export(pb.ExportImageRequest(ref="e", path=str(tmp_path / "out.tar"), format="docker-archive")).path
    assert Path(out).is_file()
    assert stub.DiskUsage(pb.DiskUsageRequest()).layers == 1
    stub.Remove(pb.ImageRef(ref="e"))
    pruned = stub.Prune(pb.PruneRequest())
    assert len(pruned.layers_removed) == 1 and stub.DiskUsage(pb.DiskUsageRequest()).layers == 0
    assert image.digest not in [i.digest for i in stub.List(pb.ListImagesRequest()).images]


def test_cli_ls_du_prune(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "DSEC_HOME": str(tmp_path / "home")}
    layout = oci_layout(tmp_path / "l", [LAYER])
    for argv, expect in ((["import", str(layout), "--tag", "cli"], "cli"), (["ls"], "cli"), (["du"], "layers 1"),
                         (["rm", "cli"], "deleted"), (["prune"], "1 layers")):
        proc = subprocess.run([sys.executable, "-m", "dsec.cli", "images", *argv], capture_output=True, text=True,
                              env=env, timeout=60)
        assert proc.returncode == 0 and expect in proc.stdout, (argv, proc.stdout, proc.stderr)
