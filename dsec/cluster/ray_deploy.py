"""Deploy dsec on a Ray cluster: a node agent pinned to every alive node, and a gateway in this process.

The gateway's health probe asks both Ray (does the agent actor answer?) and the node's gRPC port, so a
removed node is noticed within a couple of probe intervals whichever side fails first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RaySystemError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dsec.cluster.gateway import Gateway, Node, RunningGateway, channel_probe, serve_gateway
from dsec.cluster.node_agent import NodeAgent
from dsec.cluster.placement import Capacity
from dsec.compat.http_server import HttpDoor, start_http_door
from dsec.errors import RuntimeFailure

log = logging.getLogger("dsec.cluster")

AGENT_START_TIMEOUT_S = 180.0
PROBE_TIMEOUT_S = 2.0


@dataclass
class RayGateway:
    """A running gateway plus the node agents it routes to (actor handles by node id)."""

    running: RunningGateway
    home: str
    agents: dict[str, ray.actor.ActorHandle] = field(default_factory=dict)
    server_args: tuple[str, ...] = ()
    server_env: dict[str, str] = field(default_factory=dict)
    http_door: HttpDoor | None = None  # the E2B/SandboxFusion front door in front of the gateway (docs/compat.md)

    @property
    def address(self) -> str:
        return self.running.address

    @property
    def http_url(self) -> str | None:
        return self.http_door.url if self.http_door else None

    @property
    def gateway(self) -> Gateway:
        return self.running.gateway

    def add_nodes(self) -> list[str]:
        """Start agents on alive Ray nodes that have none yet (call after nodes join); returns their ids."""
        wanted = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] not in self.agents]
        agent_class = ray.remote(num_cpus=0, max_restarts=0)(NodeAgent)
        started = {
            node_id: agent_class.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
                name=f"dsec-node-{node_id[:12]}",
            ).remote(self.home, server_args=self.server_args, server_env=self.server_env)
            for node_id in wanted
        }
        for node_id, agent in started.items():
            try:
                info = ray.get(agent.info.remote(), timeout=AGENT_START_TIMEOUT_S)
            except (RayActorError, GetTimeoutError, RaySystemError) as exc:
                raise RuntimeFailure(f"dsec node agent on Ray node {node_id} did not start: {exc}") from exc
            self.agents[node_id] = agent
            self.gateway.add_node(node_id, info["address"], Capacity(**info["capacity"]))
        return list(started)

    def stop(self) -> None:
        """Stop the HTTP door and the gateway, then every agent (each destroys its node's sandboxes)."""
        if self.http_door is not None:
            self.http_door.stop()
        self.running.stop()
        for node_id, agent in self.agents.items():
            try:
                ray.get(agent.stop.remote(), timeout=120)
            except (RayActorError, GetTimeoutError, RaySystemError):
                log.info("agent on node %s already gone", node_id)
            ray.kill(agent)
        self.agents.clear()


def _ray_probe(agents: dict[str, ray.actor.ActorHandle]):
    def probe(node: Node) -> bool:
        agent = agents.get(node.node_id)
        if agent is None:
            return channel_probe(node, PROBE_TIMEOUT_S)
        try:
            alive = bool(ray.get(agent.ping.remote(), timeout=PROBE_TIMEOUT_S))
        except (RayActorError, GetTimeoutError, RaySystemError):
            return False
        return alive and channel_probe(node, PROBE_TIMEOUT_S)

    return probe


def deploy(
    home: str,
    listen: str = "127.0.0.1:0",
    probe_interval_s: float = 1.0,
    server_args: tuple[str, ...] = (),
    server_env: dict[str, str] | None = None,
    http_listen: str = "",
) -> RayGateway:
    """Start node agents on every alive node of the connected Ray cluster and a gateway on `listen`.

    `home` is each node server's DSEC_HOME (node-local paths; on one machine the nodes share it safely:
    each server owns its own run directory). Set `server_env={"DSEC_TRAJECTORY_DSN": ...}` so trajectories
    logged on one node resume on another. `http_listen` (host:port) also serves the HTTP front door — the
    E2B and SandboxFusion APIs — as a client of the gateway, so one address fronts the whole cluster.
    """
    if not ray.is_initialized():
        raise RuntimeFailure("connect to a Ray cluster first (ray.init(address=...))")
    agents: dict[str, ray.actor.ActorHandle] = {}
    gateway = Gateway(probe=_ray_probe(agents))
    deployment = RayGateway(serve_gateway(gateway, listen, probe_interval_s), home, agents, tuple(server_args), dict(server_env or {}))
    try:
        deployment.add_nodes()
        if http_listen:
            deployment.http_door = start_http_door(http_listen, deployment.address)
    except BaseException:
        deployment.stop()
        raise
    return deployment
