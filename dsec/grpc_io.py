"""Choose gRPC core's I/O path for dsec's processes before grpc is first imported.

Why: grpcio >= 1.6x serves client calls and server listeners through its EventEngine by default, whose own
poller and callback threads read the socket and then hand each completion to the thread waiting on the
completion queue: one more thread wake-up on each side of every RPC. Its older path (iomgr) reads the socket in
the waiting thread itself. On the 2-core VM of docs/benchmarks.md ("Exec round trip, part 6") the switch took
a gRPC echo between two processes from 0.49 to 0.23-0.26 ms back to back, and a dsec exec of `true` from 2.88 to
2.68 ms after a `docker exec` (1.86 to 1.73 back to back; four alternated pairs, each lower).

gRPC reads `GRPC_EXPERIMENTS` once, when grpc is imported, so `dsec/__init__.py` calls `prefer_iomgr()` before it
imports anything that imports grpc; a process that imported grpc before dsec keeps its EventEngine. A value the
user set (even empty) is kept: it is an opt-out. Child processes inherit the variable (the embedded server does,
which is what the server side needs).
"""

from __future__ import annotations

import os
import sys

GRPC_EXPERIMENTS = "GRPC_EXPERIMENTS"
IOMGR_EXPERIMENTS = "-event_engine_client,-event_engine_listener"
"""The EventEngine experiments turned off: client channels and server listeners. grpc logs an error for a name
it does not know; tests/test_grpc_io.py checks the installed grpcio knows both."""


def prefer_iomgr() -> None:
    """Set GRPC_EXPERIMENTS to IOMGR_EXPERIMENTS unless the user set it or grpc is already imported (too late
    to matter, and a later child process should get the user's grpc defaults then)."""
    if "grpc" not in sys.modules:
        os.environ.setdefault(GRPC_EXPERIMENTS, IOMGR_EXPERIMENTS)
