"""Placement policy: which node gets a new sandbox. Pure (no I/O), so it is unit-tested and simulated.

Policy: dominant-resource least-loaded. A node's load is the largest of its used fractions of cores,
memory and sandbox slots; a sandbox goes to the feasible node whose load is lowest.
That spreads load (no node fills up while others idle) and respects every dimension of capacity: a node
with free cores but no free memory is never chosen. A lazy min-heap keyed by load keeps a placement at
O(log n) amortised, which is what lets the 100,000-over-1,000 simulation run in about a second.
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass, field

from dsec.errors import CapacityExceeded


@dataclass(frozen=True)
class Demand:
    """What one sandbox takes from its node."""

    cpus: float = 1.0
    memory_mb: int = 512

    def __post_init__(self) -> None:
        if self.cpus < 0 or self.memory_mb < 0:
            raise ValueError(f"a sandbox demand cannot be negative: {self}")


@dataclass(frozen=True)
class Capacity:
    """What a node offers. Cores may be overcommitted by the caller (cpus = cores × ratio)."""

    cpus: float
    memory_mb: int
    sandboxes: int

    def __post_init__(self) -> None:
        if self.cpus <= 0 or self.memory_mb <= 0 or self.sandboxes <= 0:
            raise ValueError(f"a node capacity must be positive in every dimension: {self}")


@dataclass
class NodeLoad:
    node_id: str
    capacity: Capacity
    cpus: float = 0.0
    memory_mb: int = 0
    sandboxes: int = 0
    version: int = 0  # bumped on every change, so stale heap entries are recognised and skipped

    def fits(self, demand: Demand) -> bool:
        c = self.capacity
        return (
            self.sandboxes + 1 <= c.sandboxes
            and self.cpus + demand.cpus <= c.cpus + 1e-9
            and self.memory_mb + demand.memory_mb <= c.memory_mb
        )

    def load(self) -> float:
        """Dominant used fraction, in [0, 1]."""
        c = self.capacity
        return max(self.cpus / c.cpus, self.memory_mb / c.memory_mb, self.sandboxes / c.sandboxes)


@dataclass
class Placement:
    """The cluster's view of node loads; `place` reserves capacity, `release` returns it.

    Not thread-safe by itself: the gateway holds one lock around it (placements take microseconds).
    """

    nodes: dict[str, NodeLoad] = field(default_factory=dict)
    _heap: list[tuple[float, int, str]] = field(default_factory=list)

    def add_node(self, node_id: str, capacity: Capacity) -> None:
        """Register (or re-register with a new capacity) a node; its current usage is kept."""
        node = self.nodes.get(node_id)
        if node is None:
            node = self.nodes[node_id] = NodeLoad(node_id, capacity)
        else:
            node.capacity = capacity
        self._touch(node)

    def remove_node(self, node_id: str) -> None:
        """Forget a node (lost or drained): it gets no more placements."""
        self.nodes.pop(node_id, None)

    def place(self, demand: Demand) -> str:
        """Reserve `demand` on the least-loaded node that fits it and return that node's id."""
        skipped: list[tuple[float, int, str]] = []
        chosen: NodeLoad | None = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            _, version, node_id = entry
            node = self.nodes.get(node_id)
            if node is None or node.version != version:
                continue  # stale entry: the node changed or left since it was pushed
            if node.fits(demand):
                chosen = node
                break
            skipped.append(entry)  # full for this demand; may still fit a smaller one
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        if chosen is None:
            raise CapacityExceeded(
                f"no node has room for a sandbox of {demand.cpus:g} cores and {demand.memory_mb} MB "
                f"({len(self.nodes)} nodes); destroy sandboxes or add nodes",
                retry_after_s=1.0,
            )
        chosen.cpus += demand.cpus
        chosen.memory_mb += demand.memory_mb
        chosen.sandboxes += 1
        self._touch(chosen)
        return chosen.node_id

    def charge(self, node_id: str, demand: Demand) -> None:
        """Account for a sandbox a node created without a placement decision (restore, fork)."""
        node = self.nodes.get(node_id)
        if node is None:
            return
        node.cpus += demand.cpus
        node.memory_mb += demand.memory_mb
        node.sandboxes += 1
        self._touch(node)

    def release(self, node_id: str, demand: Demand) -> None:
        """Return a destroyed sandbox's share; unknown nodes (already lost) are ignored."""
        node = self.nodes.get(node_id)
        if node is None:
            return
        node.cpus = max(0.0, node.cpus - demand.cpus)
        node.memory_mb = max(0, node.memory_mb - demand.memory_mb)
        node.sandboxes = max(0, node.sandboxes - 1)
        self._touch(node)

    def _touch(self, node: NodeLoad) -> None:
        node.version += 1
        heapq.heappush(self._heap, (node.load(), node.version, node.node_id))
        if len(self._heap) > 4 * len(self.nodes) + 64:
            self._compact()

    def _compact(self) -> None:
        """Drop stale entries so the heap stays O(nodes) however many placements happened."""
        self._heap = [(n.load(), n.version, n.node_id) for n in self.nodes.values()]
        heapq.heapify(self._heap)


@dataclass(frozen=True)
class SimulationReport:
    sandboxes: int
    nodes: int
    placed: int
    rejected: int
    seconds: float
    placements_per_s: float
    max_load: float
    min_load: float


def simulate(n_sandboxes: int = 100_000, n_nodes: int = 1_000, seed: int = 0) -> SimulationReport:
    """Place `n_sandboxes` random demands on `n_nodes` heterogeneous nodes; report scheduler throughput.

    Nodes are 16–128 cores with 4 GiB per core and 64–512 sandbox slots; demands are 0.25–2 cores and
    256–4096 MB, so the cluster fills to about 80% and the spread (max vs min load) is meaningful.
    """
    rng = random.Random(seed)
    placement = Placement()
    for index in range(n_nodes):
        cores = rng.choice((16, 32, 64, 128))
        placement.add_node(f"node-{index}", Capacity(cpus=cores * 2.0, memory_mb=cores * 4096, sandboxes=cores * 4))
    demands = [Demand(cpus=rng.choice((0.25, 0.5, 1.0, 2.0)), memory_mb=rng.choice((256, 512, 1024, 2048, 4096))) for _ in range(n_sandboxes)]
    placed = rejected = 0
    started = time.perf_counter()
    for demand in demands:
        try:
            placement.place(demand)
            placed += 1
        except CapacityExceeded:
            rejected += 1
    seconds = time.perf_counter() - started
    loads = [node.load() for node in placement.nodes.values()]
    return SimulationReport(
        sandboxes=n_sandboxes,
        nodes=n_nodes,
        placed=placed,
        rejected=rejected,
        seconds=seconds,
        placements_per_s=n_sandboxes / seconds if seconds > 0 else float("inf"),
        max_load=max(loads, default=0.0),
        min_load=min(loads, default=0.0),
    )
