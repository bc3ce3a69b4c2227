"""The two ways an exec travels: `ExecCollect` (one reply, the SDK's default) and `Exec` (a stream, for output
callbacks and as the fallback). Both must give the same result; the fallback must never run a command twice."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from dsec.errors import ERROR_METADATA_KEY
from dsec.sdk.transport import Connection
from dsec.server.sandbox_service import COLLECT_MAX_OUTPUT
from dsec.v1 import sandbox_pb2 as pb


@pytest.fixture
def busybox(client):
    sb = client.create("busybox", "container", driver="crun", timeout_s=300)
    yield sb
    sb.destroy()


def _streamed(client, request: pb.ExecRequest) -> pb.ExecRecord:
    record = pb.ExecRecord()
    for event in client.execs.Exec(request, timeout=60):
        which = event.WhichOneof("event")
        if which == "status":
            record.status.CopyFrom(event.status)
        else:
            setattr(record, which, getattr(record, which) + getattr(event, which))
    return record


def test_collect_and_stream_give_the_same_record(client, busybox):
    request = pb.ExecRequest(sandbox_id=busybox.id, command="printf out; printf err >&2; exit 3", max_output_bytes=2)
    collected = client.execs.ExecCollect(request, timeout=60)
    streamed = _streamed(client, request)
    for record in (collected, streamed):
        assert (record.stdout, record.stderr) == (b"ou", b"er")
        assert record.status.exit_code == 3
        assert record.status.stdout_truncated and record.status.stderr_truncated
        assert record.status.memory_limit_mb > 0


def test_a_cap_too_large_for_one_reply_is_refused_before_running(client, busybox):
    marker = "/tmp/ran-once"
    request = pb.ExecRequest(sandbox_id=busybox.id, command=f"echo x >> {marker}", max_output_bytes=COLLECT_MAX_OUTPUT + 1)
    with pytest.raises(grpc.RpcError) as refused:
        client.execs.ExecCollect(request, timeout=60)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert dict(refused.value.trailing_metadata() or ()).get(ERROR_METADATA_KEY) == "Unsupported"
    assert busybox.exec(f"cat {marker} 2>/dev/null; true").stdout == b"", "the refused call ran the command"
    # the SDK takes the stream for it, and runs the command exactly once
    result = busybox.exec(f"echo x >> {marker}", max_output_bytes=COLLECT_MAX_OUTPUT + 1)
    assert result.exit_code == 0
    assert busybox.exec(f"cat {marker}").stdout == b"x\n"


def test_a_server_without_exec_collect_is_asked_once():
    """grpc's own UNIMPLEMENTED (no dsec error class): the method is missing there, remembered per connection."""
    bare = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    connection = Connection(f"127.0.0.1:{port}")
    try:
        method = connection.execs.ExecCollect
        assert connection.unary_if_served(method, pb.ExecRequest(sandbox_id="sb-x", argv=["true"]), timeout=10) is None
        assert method in connection._unserved
        assert connection.unary_if_served(method, pb.ExecRequest(sandbox_id="sb-x", argv=["true"]), timeout=10) is None
    finally:
        connection.close()
        bare.stop(None)


def test_collect_errors_are_typed(client):
    with pytest.raises(grpc.RpcError) as missing:
        client.execs.ExecCollect(pb.ExecRequest(sandbox_id="sb-0000000000000000", argv=["true"]), timeout=60)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(missing.value.trailing_metadata() or ()).get(ERROR_METADATA_KEY) == "SandboxNotFound"
