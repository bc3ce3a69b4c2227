"""Malformed, random and oversized gRPC messages against a live server: typed errors only, server stays up.

"Typed" means a status carrying the `dsec-error` trailer that names a `dsec.errors` class (what the SDK turns
into an exception), never INTERNAL from an unexpected server exception. Bytes that are not a valid protobuf
message never reach dsec code: gRPC itself answers them, and the server must survive that too.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsec.errors import ERROR_METADATA_KEY, error_class
from dsec.v1 import sandbox_pb2 as pb

from .strategies import messages

FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SERVICE = "/dsec.v1.SandboxService/"
# Every method of the service, each with its real request type, read from the descriptor: a method added to the
# proto is fuzzed without an edit here.
_METHODS = pb.DESCRIPTOR.services_by_name["SandboxService"].methods
_REQUEST = {m.name: message_factory.GetMessageClass(m.input_type) for m in _METHODS}
UNARY = {m.name: _REQUEST[m.name] for m in _METHODS if not m.client_streaming and not m.server_streaming}
SERVER_STREAM = {m.name: _REQUEST[m.name] for m in _METHODS if m.server_streaming and not m.client_streaming}
CLIENT_STREAM = {m.name: _REQUEST[m.name] for m in _METHODS if m.client_streaming and not m.server_streaming}
RPC_TIMEOUT_S = 60.0


def test_every_method_is_fuzzed():
    assert len(UNARY) + len(SERVER_STREAM) + len(CLIENT_STREAM) == len(_METHODS) >= 27


def assert_typed(exc: grpc.RpcError, method: str) -> str:
    """The status names a dsec error class and is not an internal failure; returns the class name."""
    trailers = dict(exc.trailing_metadata() or ())
    name = trailers.get(ERROR_METADATA_KEY, "")
    assert name, f"{method}: untyped status {exc.code().name}: {exc.details()}"
    assert error_class(name) is not None, f"{method}: unknown error class {name!r}"
    assert exc.code() != grpc.StatusCode.INTERNAL, f"{method}: internal error {name}: {exc.details()}"
    return name


def _destroy_created(stub, response) -> None:
    """A fuzzed Create/Restore/Fork that happened to be valid made real sandboxes: remove them."""
    infos = list(response.sandboxes) if isinstance(response, pb.ForkResponse) else [response] if isinstance(response, pb.SandboxInfo) else []
    for info in infos:
        if info.id and info.state != "destroyed":
            try:
                stub.Destroy(pb.SandboxRef(sandbox_id=info.id), timeout=RPC_TIMEOUT_S)
            except grpc.RpcError as exc:
                assert_typed(exc, "Destroy")


def assert_alive(stub) -> None:
    stub.List(pb.ListRequest(), timeout=RPC_TIMEOUT_S)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", sorted(UNARY))
def test_unary_random_messages(stub, method):
    @FUZZ
    @given(request=messages(UNARY[method]))
    def run(request):
        try:
            response = getattr(stub, method)(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            assert_typed(exc, method)
        else:
            _destroy_created(stub, response)

    run()
    assert_alive(stub)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", sorted(SERVER_STREAM))
def test_server_stream_random_messages(stub, method):
    @FUZZ
    @given(request=messages(SERVER_STREAM[method]))
    def run(request):
        try:
            for _ in getattr(stub, method)(request, timeout=RPC_TIMEOUT_S):
                pass
        except grpc.RpcError as exc:
            assert_typed(exc, method)

    run()
    assert_alive(stub)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", sorted(CLIENT_STREAM))
def test_client_stream_random_sequences(stub, method):
    @FUZZ
    @given(requests=st.lists(messages(CLIENT_STREAM[method]), max_size=5))
    def run(requests):
        try:
            getattr(stub, method)(iter(requests), timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            assert_typed(exc, method)

    run()
    assert_alive(stub)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["Create", "Get", "Exec", "WriteFile"])
def test_raw_bytes_are_answered_not_crashed(channel, stub, method):
    """Arbitrary wire bytes (bad tags, truncated fields, invalid UTF-8 in strings) as a request."""
    if method in CLIENT_STREAM:
        call = channel.stream_unary(SERVICE + method)
    elif method in SERVER_STREAM:
        call = channel.unary_stream(SERVICE + method)
    else:
        call = channel.unary_unary(SERVICE + method)

    @FUZZ
    @given(payload=st.one_of(st.binary(max_size=512), st.sampled_from([b"\x0a\x03\xff\xfe\xfd", b"\x0a\xff\xff\xff\xff\x0f", b"\xff"])))
    def run(payload):
        try:
            if method in CLIENT_STREAM:
                call(iter([payload]), timeout=RPC_TIMEOUT_S)
            elif method in SERVER_STREAM:
                for _ in call(payload, timeout=RPC_TIMEOUT_S):
                    pass
            else:
                response = call(payload, timeout=RPC_TIMEOUT_S)
                if method == "Create":
                    _destroy_created(stub, pb.SandboxInfo.FromString(response))
        except grpc.RpcError as exc:
            if ERROR_METADATA_KEY in dict(exc.trailing_metadata() or ()):
                assert_typed(exc, method)
            else:  # gRPC rejected the bytes before any dsec code ran
                assert "deserializ" in (exc.details() or "").lower(), f"{method}: {exc.code().name}: {exc.details()}"

    run()
    assert_alive(stub)


def test_invalid_utf8_in_a_string_field_is_rejected(channel, stub):
    """Field 1 of SandboxRef (sandbox_id) as length-delimited bytes that are not UTF-8."""
    call = channel.unary_unary(SERVICE + "Get")
    with pytest.raises(grpc.RpcError) as excinfo:
        call(b"\x0a\x04\xc3\x28\xff\xfe", timeout=RPC_TIMEOUT_S)
    assert excinfo.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    assert_alive(stub)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["Exec", "Call", "Create"])
def test_oversized_messages_are_resource_exhausted(stub, method):
    """Beyond the 64 MiB message limit: RESOURCE_EXHAUSTED from gRPC, server unaffected."""
    huge = b"x" * ((64 << 20) + 1024)
    if method == "Exec":
        request = pb.ExecRequest(sandbox_id="nope", command="true", stdin=huge)
        send = lambda: list(stub.Exec(request, timeout=RPC_TIMEOUT_S))  # noqa: E731
    elif method == "Call":
        send = lambda: stub.Call(pb.CallRequest(sandbox_id="nope", payload=huge), timeout=RPC_TIMEOUT_S)  # noqa: E731
    else:
        request = pb.CreateRequest(spec=pb.SandboxSpec(image="busybox", labels={"big": huge.decode()}))
        send = lambda: stub.Create(request, timeout=RPC_TIMEOUT_S)  # noqa: E731
    with pytest.raises(grpc.RpcError) as excinfo:
        send()
    assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, excinfo.value.details()
    assert_alive(stub)


def test_many_oversized_stream_chunks_are_bounded(stub):
    """A WriteFile stream of 2 x 60 MiB chunks to a missing sandbox: typed NOT_FOUND, no buffering blow-up."""
    chunk = b"y" * (60 << 20)
    requests = [pb.WriteFileRequest(header=pb.WriteFileHeader(sandbox_id="nope", path="/tmp/x")), pb.WriteFileRequest(data=chunk), pb.WriteFileRequest(data=chunk)]
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.WriteFile(iter(requests), timeout=RPC_TIMEOUT_S)
    assert assert_typed(excinfo.value, "WriteFile") == "SandboxNotFound"
    assert_alive(stub)


@pytest.fixture(scope="module")
def live_sandbox(stub):
    """A real busybox sandbox, so fuzzed requests reach the exec engine and the file API, not just lookup."""
    info = stub.Create(pb.CreateRequest(spec=pb.SandboxSpec(image="busybox", substrate="container")), timeout=120)
    yield info.id
    stub.Destroy(pb.SandboxRef(sandbox_id=info.id), timeout=RPC_TIMEOUT_S)


def _bounded(request, sandbox_id: str):
    """Aim at the live sandbox and cap the exec time, so a fuzzed command cannot run for long."""
    if hasattr(request, "sandbox_id"):
        request.sandbox_id = sandbox_id
    if hasattr(request, "timeout_s"):
        request.timeout_s = 5.0
    if isinstance(request, pb.ExecRequest):
        if request.argv and request.command:
            del request.argv[:]  # exactly one of them, so most requests reach the exec engine
        request.ClearField("step")
    return request


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["Exec", "ReadFile", "Download", "ListDir", "StartSession"])
def test_random_requests_against_a_live_sandbox(stub, live_sandbox, method):
    cls = {**UNARY, **SERVER_STREAM, "StartSession": pb.StartSessionRequest}[method]

    @settings(FUZZ, max_examples=60)
    @given(request=messages(cls))
    def run(request):
        request = _bounded(request, live_sandbox)
        try:
            response = getattr(stub, method)(request, timeout=RPC_TIMEOUT_S)
            if method in SERVER_STREAM:
                list(response)
        except grpc.RpcError as exc:
            assert_typed(exc, method)

    run()
    assert_alive(stub)
    assert stub.Get(pb.SandboxRef(sandbox_id=live_sandbox), timeout=RPC_TIMEOUT_S).state == "running"


@pytest.mark.timeout(600)
def test_random_file_writes_against_a_live_sandbox(stub, live_sandbox):
    @settings(FUZZ, max_examples=60)
    @given(header=messages(pb.WriteFileHeader), chunks=st.lists(st.binary(max_size=4096), max_size=3))
    def run(header, chunks):
        header.sandbox_id = live_sandbox
        requests = [pb.WriteFileRequest(header=header)] + [pb.WriteFileRequest(data=c) for c in chunks]
        try:
            stub.WriteFile(iter(requests), timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            assert_typed(exc, "WriteFile")

    run()
    assert_alive(stub)
