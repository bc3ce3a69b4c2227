"""Random ProcessService requests against a live server, half of them aimed at a real sandbox: typed errors only
(a `dsec-error` trailer naming a dsec.errors class, never INTERNAL), no stream left hanging, the server stays up.

Processes the fuzzer starts run `true` (argv[0] is pinned; everything else is drawn), so a drawn command line
cannot damage the sandbox the other examples use."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsec.v1 import process_pb2 as ppb
from dsec.v1 import process_pb2_grpc as ppb_grpc
from dsec.v1 import sandbox_pb2 as pb

from .strategies import messages
from .test_grpc_fuzz import FUZZ, RPC_TIMEOUT_S, assert_alive, assert_typed

STREAM_S = 20.0  # a started `true` ends at once; a Connect to a running one is cut here (DEADLINE_EXCEEDED)
METHODS = {
    "Start": ppb.StartProcessRequest,
    "Connect": ppb.ProcessSelector,
    "List": ppb.ListProcessesRequest,
    "SendInput": ppb.ProcessInput,
    "CloseStdin": ppb.ProcessSelector,
    "SendSignal": ppb.SignalProcessRequest,
    "ResizePty": ppb.ResizePtyRequest,
}


@pytest.fixture(scope="module")
def target(stub):
    """A real sandbox for the fuzzed requests to reach past the sandbox lookup."""
    info = stub.Create(pb.CreateRequest(spec=pb.SandboxSpec(image="busybox", substrate="container")), timeout=120)
    yield info.id
    stub.Destroy(pb.SandboxRef(sandbox_id=info.id), timeout=RPC_TIMEOUT_S)


def _aim(request, sandbox_id: str) -> None:
    """Point the request at the real sandbox and make any process it starts harmless."""
    holder = request.process if hasattr(request, "process") and not isinstance(request, ppb.StartProcessRequest) else request
    holder.sandbox_id = sandbox_id
    if isinstance(request, ppb.StartProcessRequest):
        del request.argv[:]
        request.argv.append("true")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_process_service_random_messages(channel, stub, target, method):
    process_stub = ppb_grpc.ProcessServiceStub(channel)
    streaming = method in ("Start", "Connect")

    @FUZZ
    @given(request=messages(METHODS[method]), aimed=st.booleans())
    def run(request, aimed):
        if aimed:
            _aim(request, target)
        try:
            if streaming:
                for _ in getattr(process_stub, method)(request, timeout=STREAM_S):
                    pass
            else:
                getattr(process_stub, method)(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and method == "Connect":
                return  # attached to a process that still runs: the client's own deadline, not a server error
            assert_typed(exc, method)

    run()
    assert_alive(stub)
