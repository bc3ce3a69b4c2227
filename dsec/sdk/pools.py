"""`client.pools`: the server's warm pools (docs/lifecycle.md) — list them, create/resize/remove one.

A pool keeps `size` ready sandboxes of one shape (image, substrate, driver, resources); a `client.create` with
that shape (and no network options or workdir) is served from it at once. Resizing needs the operator's rights
(an open server, or the default tenant's token).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsec import wire
from dsec.models import PoolInfo
from dsec.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from dsec.sdk.client import Client


class Pools:
    def __init__(self, client: Client) -> None:
        self.client = client

    def list(self) -> list[PoolInfo]:
        reply = self.client.rpc(self.client.sandboxes.ListPools, pb.Empty())
        return [wire.from_pb_as(PoolInfo, info) for info in reply.pools]

    def resize(
        self, image: str, size: int, *, substrate: str = "container", driver: str = "", cpu: float = 0.0,
        memory_mb: int = 0, pids: int = 0, disk_mb: int = 0, network_allow: list[str] | None = None, max_size: int = 0,
    ) -> PoolInfo:
        """Create the pool of this shape, or resize it; size 0 removes it (its ready sandboxes are destroyed).
        Resources left at 0 are the server's defaults, as in `client.create`; `network_allow` is the egress
        allowlist its sandboxes are built with (a create with the same allowlist claims one). `max_size` above
        `size` makes the pool follow demand: as many ready as creates of its shape in the last minute, up to it."""
        shape = pb.PoolShape(image=image, substrate=substrate, driver=driver, network_allow=network_allow or [],
                             resources=pb.Resources(cpu=cpu, memory_mb=memory_mb, pids=pids, disk_mb=disk_mb))
        request = pb.ResizePoolRequest(shape=shape, size=size, max_size=max_size)
        return wire.from_pb_as(PoolInfo, self.client.rpc(self.client.sandboxes.ResizePool, request))

    def get(self, image: str, substrate: str = "container", network_allow: list[str] | None = None) -> PoolInfo | None:
        wanted = network_allow or []
        return next((p for p in self.list() if p.image == image and p.substrate == substrate
                     and p.network_allow == wanted), None)
