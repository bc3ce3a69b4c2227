"""The exec lane: execs one after another as messages on one open ExecLane call (dsec/sdk/exec_lane.py,
dsec/server/exec_lanes.py). It must give ExecCollect's results and errors, never answer a request with another's
reply, and step aside (the caller makes its ExecCollect call) whenever it cannot take an exec, without running it."""

from __future__ import annotations

import threading

import grpc
import pytest

import dsec
from dsec.config import ServerConfig
from dsec.errors import ExecTimeout, RuntimeFailure, SandboxNotFound
from dsec.sdk import exec_lane as lane_module
from dsec.sdk.exec_lane import ExecLane
from dsec.server.main import serve
from dsec.v1 import sandbox_pb2 as pb


@pytest.fixture
def busybox(client):
    sb = client.create("busybox", "container", driver="crun", timeout_s=300)
    yield sb
    sb.destroy()


def test_execs_travel_on_one_lane_with_collects_results(client, busybox):
    request = pb.ExecRequest(sandbox_id=busybox.id, command="printf out; printf err >&2; exit 3", max_output_bytes=2)
    collected = client.execs.ExecCollect(request, timeout=60)
    laned = client.exec_lane.collect(request, None, lambda record: record)
    assert laned is not None
    assert (laned.stdout, laned.stderr, laned.status.exit_code) == (b"ou", b"er", 3) == (
        collected.stdout, collected.stderr, collected.status.exit_code)
    assert laned.status.stdout_truncated and laned.status.stderr_truncated and laned.status.memory_limit_mb > 0
    stream = client.exec_lane._stream
    for expected in (0, 1, 7):
        assert busybox.exec(f"exit {expected}").exit_code == expected
    assert client.exec_lane._stream is stream, "each exec opened a new call"


def test_an_error_ends_the_lane_typed_and_the_next_exec_opens_another(client, busybox):
    busybox.exec("true")
    before = client.exec_lane._stream
    with pytest.raises(SandboxNotFound):
        client.exec_lane.collect(pb.ExecRequest(sandbox_id="sb-0000000000000000", argv=["true"]), None, _same)
    assert client.exec_lane._stream is None
    assert busybox.exec("echo again").stdout == b"again\n"
    assert client.exec_lane._stream is not None and client.exec_lane._stream is not before


def test_a_busy_lane_sends_the_exec_as_its_own_call(client, busybox):
    busybox.exec("true")
    seq = client.exec_lane._seq
    with client.exec_lane._busy:  # another thread's exec holds the lane
        assert busybox.exec("echo side").stdout == b"side\n"
    assert client.exec_lane._seq == seq, "the exec waited for the lane instead of taking ExecCollect"


def test_threads_share_a_connection(client, busybox):
    results: list[bytes] = []

    def run(i: int) -> None:
        for _ in range(10):
            results.append(busybox.exec(f"echo {i}").stdout)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == sorted(f"{i}\n".encode() for i in range(4) for _ in range(10))


def test_a_server_at_its_lane_limit_refuses_before_reading_and_execs_still_run():
    running = serve(ServerConfig(listen="127.0.0.1:0", exec_lanes=1))
    first, second = dsec.Client(running.address), dsec.Client(running.address)
    try:
        with first.create("busybox", "container", driver="crun") as sb:
            assert sb.exec("true").ok and first.exec_lane._stream is not None  # holds the server's one lane
            other = second.connect(sb.id)
            marker = "/tmp/runs"
            assert other.exec(f"echo x >> {marker}").ok
            assert second.exec_lane._stream is None and second.exec_lane._refused_until > 0
            assert sb.exec(f"cat {marker}").stdout == b"x\n", "the refused lane's exec did not run exactly once"
    finally:
        first.close()
        second.close()
        running.stop()


def test_a_server_with_lanes_off_refuses_them_and_execs_still_run():
    running = serve(ServerConfig(listen="127.0.0.1:0", exec_lanes=0))
    client = dsec.Client(running.address)
    try:
        with client.create("busybox", "container", driver="crun") as sb:
            assert sb.exec("echo ok").stdout == b"ok\n"
            assert client.exec_lane._refused_until > 0
    finally:
        client.close()
        running.stop()


class _Cancelled(grpc.RpcError):
    def code(self):  # type: ignore[no-untyped-def]
        return grpc.StatusCode.CANCELLED

    def trailing_metadata(self):  # type: ignore[no-untyped-def]
        return ()


class _Replies:
    """An ExecLane call whose replies are scripted: each `next` returns or raises the next item, or blocks until
    cancelled when the script is empty (a server that never answers)."""

    def __init__(self, script: list) -> None:
        self.script = script
        self.cancelled = threading.Event()

    def __next__(self):  # type: ignore[no-untyped-def]
        if self.script:
            item = self.script.pop(0)
            if isinstance(item, BaseException):
                raise item
            return item
        self.cancelled.wait(60)
        raise _Cancelled()

    def done(self) -> bool:
        return self.cancelled.is_set()

    def cancel(self) -> None:
        self.cancelled.set()


class _Stub:
    def __init__(self, *scripts: list) -> None:
        self.calls = [_Replies(script) for script in scripts]
        self.opened = 0

    def ExecLane(self, requests, metadata):  # type: ignore[no-untyped-def]
        self.opened += 1
        return self.calls[self.opened - 1]


def _same(record: pb.ExecRecord) -> pb.ExecRecord:
    return record


def _request() -> pb.ExecRequest:
    return pb.ExecRequest(sandbox_id="sb-x", argv=["true"])


def test_an_unanswered_exec_ends_at_its_deadline(monkeypatch):
    monkeypatch.setattr(lane_module, "WATCHDOG_TICK_S", 0.01)
    lane = ExecLane(_Stub([]), lambda: [])
    with pytest.raises(ExecTimeout):
        lane.collect(_request(), 0.05, _same)
    assert lane._stream is None
    lane.close()


def test_an_interrupted_exec_never_answers_the_next_one():
    lane = ExecLane(_Stub([KeyboardInterrupt()], [pb.ExecLaneReply(seq=2)]), lambda: [])
    with pytest.raises(KeyboardInterrupt):
        lane.collect(_request(), None, _same)
    assert lane._stream is None, "the interrupted call stayed open: its late reply would answer the next exec"
    assert lane.collect(_request(), None, _same) is not None
    assert lane._stub.opened == 2
    lane.close()


def test_a_reply_to_another_request_resets_the_lane():
    lane = ExecLane(_Stub([pb.ExecLaneReply(seq=5)]), lambda: [])
    with pytest.raises(RuntimeFailure, match="answered request 5 to request 1"):
        lane.collect(_request(), None, _same)
    assert lane._stream is None
    lane.close()
