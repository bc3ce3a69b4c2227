"""The node agent: one per Ray node, pinned there, running that node's dsec server.

Why a child `dsec serve` process in its own session, not the server in the actor's threads: the server
watches the actor's pid and destroys its sandboxes the moment the actor dies (node removed, actor killed,
even kill -9). Its own session keeps it out of the process group Ray kills with the worker, so it lives
long enough to clean up: a lost node leaves no containers, mounts or cgroups behind.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import ray

from dsec.server.launch import launch_server, stop_server_process

DEFAULT_OVERCOMMIT = 4.0  # sandboxes mostly wait on the trainer: offer 4 sandbox-cores per core


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def _node_cpus(node_id: str) -> float:
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return float(node.get("Resources", {}).get("CPU", 0.0)) or float(os.cpu_count() or 1)
    return float(os.cpu_count() or 1)


def start_node_server(home: Path, args: list[str]) -> tuple[subprocess.Popen, str]:
    """`dsec serve` bound to this actor's life (--parent-pid), in a new session; returns (process, address)."""
    launched = launch_server(home, args, log_name="node", new_session=True)
    return launched.process, launched.address


class NodeAgent:
    """Runs as a Ray actor (`ray.remote(NodeAgent)`), scheduled with a hard node affinity."""

    def __init__(
        self,
        home: str,
        max_sandboxes: int = 1024,
        overcommit: float = DEFAULT_OVERCOMMIT,
        server_args: tuple[str, ...] = (),
        server_env: dict[str, str] | None = None,
    ) -> None:
        """`server_env` reaches the node's server, e.g. DSEC_TRAJECTORY_DSN so every node logs to one database."""
        self.node_id = ray.get_runtime_context().get_node_id()
        os.environ.update(server_env or {})  # this actor's process exists only to own the server
        self.process, self.address = start_node_server(Path(home), ["--max-sandboxes", str(max_sandboxes), *server_args])
        self.capacity = {
            "cpus": _node_cpus(self.node_id) * overcommit,
            "memory_mb": _memory_mb(),
            "sandboxes": max_sandboxes,
        }

    def info(self) -> dict:
        """What the gateway needs: where this node's server listens and what it offers."""
        return {"node_id": self.node_id, "address": self.address, "capacity": self.capacity, "server_pid": self.process.pid}

    def ping(self) -> bool:
        """Alive = the actor answers and its server process still runs."""
        return self.process.poll() is None

    def stop(self, timeout_s: float = 60.0) -> None:
        """Destroy this node's sandboxes and stop its server (SIGTERM, then SIGKILL if it hangs)."""
        stop_server_process(self.process, timeout_s)
