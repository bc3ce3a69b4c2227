"""Bad input gets a typed error, over the SDK and over raw gRPC, and never takes the server down."""

from __future__ import annotations

import grpc
import pytest

import dsec
from dsec.v1 import sandbox_pb2 as pb
from dsec.v1 import sandbox_pb2_grpc as pb_grpc


def test_unknown_image(client):
    with pytest.raises(dsec.ImageNotFound, match="no-such-image"):
        client.create("no-such-image:latest")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"substrate": "quantum"},
        {"memory_mb": -5},
        {"cpu": 0},
        {"timeout_s": -1},
        {"env": {"BAD=NAME": "x"}},
        {"driver": "lxc"},
    ],
)
def test_invalid_spec_via_sdk(client, kwargs):
    options = {"substrate": "container", **kwargs}
    substrate = options.pop("substrate")
    with pytest.raises(dsec.InvalidSpec):
        client.create("busybox", substrate, **options)


def test_invalid_spec_via_raw_grpc_is_invalid_argument(client):
    stub = pb_grpc.SandboxServiceStub(grpc.insecure_channel(client.address))
    with pytest.raises(grpc.RpcError) as info:
        stub.Create(pb.CreateRequest(spec=pb.SandboxSpec(image="busybox", substrate="container", resources=pb.Resources(memory_mb=-1))))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Exec(pb.ExecRequest(sandbox_id="sb-nope", command="true")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        stub.WriteFile(iter([pb.WriteFileRequest(data=b"no header")]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_sandbox_and_session(client):
    with pytest.raises(dsec.SandboxNotFound):
        client.connect("sb-doesnotexist")
    with pytest.raises(dsec.SandboxNotFound):
        client.destroy("sb-doesnotexist")


def test_exec_needs_exactly_one_of_argv_or_command(client):
    with client.create("busybox") as sb:
        stub = pb_grpc.SandboxServiceStub(grpc.insecure_channel(client.address))
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Exec(pb.ExecRequest(sandbox_id=sb.id)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert sb.exec("echo still fine").stdout == b"still fine\n"


def test_sandbox_expires_after_its_timeout(client):
    import time

    sb = client.create("busybox", timeout_s=1.0)
    deadline = time.monotonic() + 60  # the reaper's turn comes whenever the machine gets to it: poll, don't guess
    with pytest.raises(dsec.SandboxStateError, match="timeout"):
        while time.monotonic() < deadline:
            sb.exec("true")
            time.sleep(0.1)


def test_client_images_lists_and_rejects_unknown_refs(client):
    """The image store hangs off the client: listing shows the base images; an unknown ref is ImageNotFound."""
    tags = {tag for image in client.images.ls() for tag in image.tags}
    assert {"busybox", "python"} <= tags
    with pytest.raises(dsec.ImageNotFound):
        client.images.inspect("no-such-image:latest")
