"""Exec lanes: the server's side of the `ExecLane` stream (one long-lived call carrying a client's execs in turn).

Why a stream: grpcio's sync server hands every new call from its serving thread to a worker and back again before
the handler runs (the call, then its message), and on two loaded cores those hand-offs and the call's set-up cost
0.3-0.4 ms of a 3 ms cold exec; a message on an open call only wakes the handler waiting for it
(docs/benchmarks.md, "Exec round trip, part 7").

Why a pool and a limit of their own: an open lane holds its handler's thread between execs, so lanes must never take
the RPC workers every other call needs. They run on their own threads (grpc's per-method `experimental_thread_pool`),
at most `limit` at once; the next is refused before it reads a request, and its client goes on with one call per
exec (ExecCollect), so nothing waits for a lane to close.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from dsec.errors import ERROR_METADATA_KEY

LANE_METADATA_KEY = "dsec-exec-lane"
REFUSED = "refused"
_REFUSAL_HEADROOM = 4  # threads beyond the limit, so a refusal never waits behind open lanes


class ExecLanes:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit) if limit > 0 else None
        self.pool = futures.ThreadPoolExecutor(max_workers=limit + _REFUSAL_HEADROOM, thread_name_prefix="dsec-lane")

    def handler(self, serve: Callable[[Iterator[Any], grpc.ServicerContext], Iterator[Any]]) -> Callable:
        """`serve` as the ExecLane method: on the lanes' own threads, and refused when `limit` lanes are open."""

        def ExecLane(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            if self._slots is None or not self._slots.acquire(blocking=False):
                context.set_trailing_metadata(((LANE_METADATA_KEY, REFUSED), (ERROR_METADATA_KEY, "CapacityExceeded")))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"this server keeps at most {self.limit} exec lanes open; use ExecCollect")
            try:
                yield from serve(requests, context)
            finally:
                self._slots.release()

        ExecLane.experimental_thread_pool = self.pool  # type: ignore[attr-defined]
        return ExecLane

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
