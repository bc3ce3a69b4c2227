"""Measure the agent's exec cost: the spawn round trip of `/bin/true` through `AgentClient`, on the host.

This is the floor every substrate adds to an exec (drivers add only their transport: a bind-mounted socket or a
virtio-serial port). `python -m dsec.agent.bench [N]` prints the median and p95 in milliseconds, and the
stream throughput of stdout and of file transfers (what uploads, downloads and big outputs cost).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from dsec.agent.build import agent_binary
from dsec.agent.client import AgentClient
from dsec.agent.events import Output


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


def cat_throughput(client: AgentClient, megabytes: int = 50) -> float:
    """MB/s of `megabytes` pushed through `cat` (stdin in and stdout out at the same time)."""
    block = os.urandom(1 << 20)
    proc = client.spawn(["cat"], {}, "/", stdin=True)

    def feed() -> None:
        for _ in range(megabytes):
            proc.write_stdin(block)
        proc.close_stdin()

    started = time.perf_counter()
    feeder = threading.Thread(target=feed)
    feeder.start()
    received = sum(len(e.data) for e in proc.events() if isinstance(e, Output))
    feeder.join()
    assert received == megabytes << 20
    return megabytes / (time.perf_counter() - started)


def file_throughput(client: AgentClient, path: str, megabytes: int = 20) -> tuple[float, float]:
    """(write MB/s, read MB/s) of a `megabytes` file through WRITE_FILE / READ_FILE."""
    data = os.urandom(megabytes << 20)
    started = time.perf_counter()
    client.write_file(path, [data])
    wrote = time.perf_counter() - started
    started = time.perf_counter()
    size = sum(len(chunk) for chunk in client.read_file(path))
    read = time.perf_counter() - started
    assert size == len(data)
    return megabytes / wrote, megabytes / read


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "agent.sock"
        agent = subprocess.Popen([str(agent_binary()), "--listen", str(sock)])
        try:
            with AgentClient.connect_unix(sock, timeout_s=30) as client:
                ping = statistics.median(client.ping() for _ in range(200))
                times = sorted(spawn_round_trips(client, count))
                cat = cat_throughput(client)
                write, read = file_throughput(client, str(Path(tmp) / "blob"))
        finally:
            agent.terminate()
            agent.wait(timeout=10)
    p95 = times[int(len(times) * 0.95) - 1]
    print(f"agent ping median {ping * 1e3:.3f} ms")
    print(f"spawn /bin/true round trip over {count}: median {statistics.median(times) * 1e3:.2f} ms, p95 {p95 * 1e3:.2f} ms")
    print(f"50 MB through cat: {cat:.0f} MB/s; 20 MB file: write {write:.0f} MB/s, read {read:.0f} MB/s")


if __name__ == "__main__":
    main()
