"""`ExecLane`: the SDK's side of the ExecLane stream, one per connection: a caller that runs one exec after
another sends each as a message on an open call instead of opening a call per exec (a cold exec 0.3-0.4 ms
faster on a 2-core VM; the server's side and why: dsec/server/exec_lanes.py, docs/benchmarks.md).

It carries one exec at a time. A caller that finds it busy, a server (or gateway) without it, a server at its lane
limit and a request it refuses before running (an output cap too large for one reply) all get None, and the caller
makes its one-call ExecCollect instead: whatever was refused never ran. Any other error ends the stream (the next
exec opens a new one) and is raised typed, as ExecCollect's would be; a reply that does not answer the request just
sent (impossible unless the stream broke) ends it too. The RPC deadline ExecCollect would get (timeout + margin) is
kept by a watchdog thread that cancels the stream when it passes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from dsec.errors import ERROR_METADATA_KEY, ExecTimeout, RuntimeFailure
from dsec.sdk.errors import to_dsec_error
from dsec.v1 import sandbox_pb2 as pb

LANE_METADATA_KEY = "dsec-exec-lane"  # the server's refusal (dsec/server/exec_lanes.py)
REFUSED_RETRY_S = 60.0  # after a refusal, ask for a lane again this much later
WATCHDOG_TICK_S = 1.0  # how often the watchdog looks at the deadline (the margin is 30 s)
_END = None  # the request stream's end
R = TypeVar("R")


class _Stream:
    """One open ExecLane call: its outgoing requests and its replies."""

    def __init__(self, stub: Any, metadata: list[tuple[str, str]]) -> None:
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.replies = stub.ExecLane(iter(self.outbox.get, _END), metadata=metadata)

    def usable(self) -> bool:
        return not self.replies.done()

    def close(self) -> None:
        self.outbox.put(_END)
        self.replies.cancel()


class ExecLane:
    def __init__(self, stub: Any, metadata: Any) -> None:
        """`stub`: a SandboxService stub; `metadata`: a callable giving the call metadata (auth)."""
        self._stub = stub
        self._metadata = metadata
        self._busy = threading.Lock()
        self._stream: _Stream | None = None
        self._seq = 0
        self._unserved = False
        self._refused_until = 0.0
        self._closed = False
        self._deadline: float | None = None  # monotonic, of the exec in flight
        self._expired = False
        self._watch = threading.Condition()
        self._watchdog: threading.Thread | None = None

    def collect(self, request: pb.ExecRequest, timeout_s: float | None, into: Callable[[pb.ExecRecord], R]) -> R | None:
        """`into(record)` of `request`'s record, or None when the lane cannot take it (the caller uses ExecCollect);
        `timeout_s` is the RPC deadline ExecCollect would have had (None: none)."""
        if self._unserved or self._closed or time.monotonic() < self._refused_until:
            return None
        if not self._busy.acquire(blocking=False):
            return None  # another thread's exec is on the lane
        try:
            record = self._record(request, timeout_s)
        finally:
            self._busy.release()
        return None if record is None else into(record)

    def _record(self, request: pb.ExecRequest, timeout_s: float | None) -> pb.ExecRecord | None:
        stream = self._stream
        if stream is None or not stream.usable():
            stream = self._stream = _Stream(self._stub, self._metadata())
        self._seq += 1
        seq = self._seq
        self._expired = False
        if timeout_s is not None:
            self._arm(time.monotonic() + timeout_s)
        try:
            stream.outbox.put(pb.ExecLaneRequest(seq=seq, request=request))
            reply = next(stream.replies)
        except grpc.RpcError as exc:
            self._drop(stream)
            return self._refused_or_raise(exc)
        except BaseException:
            self._drop(stream)  # interrupted mid-exec: its reply must never answer the next request
            raise
        finally:
            if timeout_s is not None:
                self._disarm()
        if reply.seq != seq:
            self._drop(stream)
            raise RuntimeFailure(f"exec lane answered request {reply.seq} to request {seq}; the lane was reset")
        return reply.record

    def _refused_or_raise(self, exc: grpc.RpcError) -> None:
        code = exc.code() if hasattr(exc, "code") else None
        trailing = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
        if self._expired and code == grpc.StatusCode.CANCELLED:
            self._expired = False
            raise ExecTimeout("the server did not answer the exec before its deadline; the exec lane was reset")
        if trailing.get(LANE_METADATA_KEY) == "refused":
            self._refused_until = time.monotonic() + REFUSED_RETRY_S
            return None
        if code == grpc.StatusCode.UNIMPLEMENTED:
            if ERROR_METADATA_KEY not in trailing:
                self._unserved = True  # grpc's own answer: no ExecLane there (an older server, a gateway)
            return None  # refused before running (e.g. an output cap too large for one reply)
        raise to_dsec_error(exc) from None

    # -- the deadline watchdog --------------------------------------------------------------------------------------
    def _arm(self, deadline: float) -> None:
        with self._watch:
            self._deadline = deadline
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch_deadlines, daemon=True, name="dsec-exec-lane-watchdog")
                self._watchdog.start()

    def _disarm(self) -> None:
        with self._watch:
            self._deadline = None

    def _watch_deadlines(self) -> None:
        with self._watch:
            while not self._closed:
                self._watch.wait(WATCHDOG_TICK_S)
                if self._deadline is not None and time.monotonic() >= self._deadline and self._stream is not None:
                    self._expired = True
                    self._deadline = None
                    self._stream.replies.cancel()

    def _drop(self, stream: _Stream) -> None:
        stream.close()
        if self._stream is stream:
            self._stream = None

    def close(self) -> None:
        with self._watch:
            self._closed = True
            self._watch.notify_all()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
