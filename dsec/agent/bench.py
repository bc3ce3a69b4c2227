"""Measure the agent's exec cost: the spawn round trip of `/bin/true` through `AgentClient`, on the host.

This is the floor every substrate adds to an exec (drivers add only their transport: a bind-mounted socket or a
virtio-serial port). `python -m dsec.agent.bench [N]` prints the median and p95 in milliseconds.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dsec.agent.build import agent_binary
from dsec.agent.client import AgentClient


def spawn_round_trips(client: AgentClient, count: int = 200, argv: list[str] | None = None) -> list[float]:
    """Seconds from spawn request to Exited for `count` sequential runs of `argv` (default `/bin/true`)."""
    argv = argv or ["/bin/true"]
    times = []
    for _ in range(count):
        started = time.perf_counter()
        for _event in client.spawn(argv, {}, "/").events():
            pass
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "agent.sock"
        agent = subprocess.Popen([str(agent_binary()), "--listen", str(sock)])
        try:
            with AgentClient.connect_unix(sock, timeout_s=30) as client:
                ping = statistics.median(client.ping() for _ in range(200))
                times = sorted(spawn_round_trips(client, count))
        finally:
            agent.terminate()
            agent.wait(timeout=10)
    p95 = times[int(len(times) * 0.95) - 1]
    print(f"agent ping median {ping * 1e3:.3f} ms")
    print(f"spawn /bin/true round trip over {count}: median {statistics.median(times) * 1e3:.2f} ms, p95 {p95 * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
