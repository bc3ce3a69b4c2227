"""Random PortService.ForwardPort streams against a live server, half of them aimed at a real sandbox with a
server listening: typed errors only (a `dsec-error` trailer naming a dsec.errors class, never INTERNAL), every
stream ends, the server stays up.

The listener is busybox `httpd`: whatever bytes the fuzzer sends it, it answers or hangs up, and the end of the
fuzzer's stream half-closes the connection, so a stream that opened ends by itself.
"""

from __future__ import annotations

import time

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsec.v1 import ports_pb2 as portpb
from dsec.v1 import ports_pb2_grpc as portpb_grpc
from dsec.v1 import sandbox_pb2 as pb

from .strategies import messages
from .test_grpc_fuzz import FUZZ, RPC_TIMEOUT_S, assert_alive, assert_typed

LISTENING_PORT = 7000
STREAM_S = 30.0


@pytest.fixture(scope="module")
def target(stub):
    """A busybox sandbox with httpd on 127.0.0.1:7000, for fuzzed streams to reach past the connect."""
    info = stub.Create(pb.CreateRequest(spec=pb.SandboxSpec(image="busybox", substrate="container")), timeout=120)
    for _ in stub.Exec(pb.ExecRequest(sandbox_id=info.id, command=f"httpd -p 127.0.0.1:{LISTENING_PORT} -h /tmp"), timeout=60):
        pass
    yield info.id
    stub.Destroy(pb.SandboxRef(sandbox_id=info.id), timeout=RPC_TIMEOUT_S)


def _wait_listening(channel, sandbox_id: str) -> None:
    forward = portpb_grpc.PortServiceStub(channel).ForwardPort
    deadline = time.monotonic() + 60
    opening = portpb.PortChunk(open=portpb.PortOpen(sandbox_id=sandbox_id, port=LISTENING_PORT))
    while True:
        try:
            for _ in forward(iter([opening]), timeout=STREAM_S):
                pass
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise


_OPEN = messages(portpb.PortOpen).map(lambda opening: portpb.PortChunk(open=opening))
_DATA = st.one_of(st.binary(max_size=300), st.just(b"GET / HTTP/1.0\r\n\r\n")).map(lambda data: portpb.PortChunk(data=data))
_STREAMS = st.builds(
    lambda first, rest: [first, *rest],
    st.one_of(_OPEN, _OPEN, messages(portpb.PortChunk)),
    st.lists(st.one_of(_DATA, _DATA, messages(portpb.PortChunk)), max_size=4),
) | st.just([])


@pytest.mark.timeout(600)
def test_port_service_random_streams(channel, stub, target):
    _wait_listening(channel, target)
    forward = portpb_grpc.PortServiceStub(channel).ForwardPort

    @FUZZ
    @given(chunks=_STREAMS, aimed=st.sampled_from(["no", "sandbox", "listener", "listener"]))
    def run(chunks, aimed):
        if aimed != "no" and chunks and chunks[0].WhichOneof("kind") == "open":
            chunks[0].open.sandbox_id = target
            if aimed == "listener":
                chunks[0].open.port = LISTENING_PORT
        try:
            for reply in forward(iter(chunks), timeout=STREAM_S):
                assert reply.WhichOneof("kind") in ("opened", "data", "close_write")
        except grpc.RpcError as exc:
            assert_typed(exc, "ForwardPort")

    run()
    assert_alive(stub)
