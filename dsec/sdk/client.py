"""`Client`: a connection to a dsec server (dsec/sdk/transport.py) with the server's collections on it: sandboxes,
snapshots, images, pools, volumes and templates."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from dsec import wire
from dsec.models import CollectedSnapshot, PushedSnapshot, SandboxInfo, SnapshotInfo
from dsec.sdk.images import Images
from dsec.sdk.pools import Pools
from dsec.sdk.sandbox import Sandbox
from dsec.sdk.snapshot_registry import pull_snapshot, push_snapshot
from dsec.sdk.templates import Templates, collect_snapshots
from dsec.sdk.transport import Connection, default_connection, set_default_factory
from dsec.sdk.volumes import Volumes
from dsec.v1 import sandbox_pb2 as pb


class Client(Connection):
    """Connection to a dsec server. With no address and no $DSEC_ADDRESS, starts an embedded server; the arguments
    are `Connection`'s (address, token, TLS, the embedded server's HTTP front door)."""

    @cached_property
    def images(self) -> Images:
        """The server's image store: `client.images.build(...)`, `.pull(...)`, `.ls()`, `.prune()`, ..."""
        return Images(self)

    @cached_property
    def pools(self) -> Pools:
        """The server's warm pools: `client.pools.list()`, `client.pools.resize("busybox", size=8)`."""
        return Pools(self)

    @cached_property
    def volumes(self) -> Volumes:
        """Named volumes: `client.volumes.create("data", size_mb=64)`, `.list()`, `.delete("data")`; mount one with
        `client.create(..., volumes=[VolumeMount(name="data", mount_path="/data")])`."""
        return Volumes(self)

    @cached_property
    def templates(self) -> Templates:
        """Ready templates: `client.templates.create("web", image="python", start=[...], ready={"tcp_port": 8000})`,
        then `client.create(template="web")` returns a sandbox with the service already answering."""
        return Templates(self)

    # -- sandboxes -------------------------------------------------------------------------------------
    def create(self, image: str = "busybox", substrate: str = "container", **options: Any) -> Sandbox:
        """Create a sandbox on this server: `Sandbox.create`'s options (resources, timeout_s, env, network,
        on_timeout, template, ready, ...), validated locally first so a typo fails before any RPC."""
        return Sandbox.create(image, substrate, client=self, **options)

    def connect(self, sandbox_id: str, *, trust_results: bool = False) -> Sandbox:
        """Re-attach to a live sandbox by id (e.g. after the rollout process restarted)."""
        return Sandbox.connect(sandbox_id, client=self, trust_results=trust_results)

    def list(self, labels: dict[str, str] | None = None) -> list[SandboxInfo]:
        reply = self.rpc(self.sandboxes.List, pb.ListRequest(labels=labels or {}))
        return [wire.from_pb_as(SandboxInfo, info) for info in reply.sandboxes]

    def destroy(self, sandbox_id: str) -> None:
        self.rpc(self.sandboxes.Destroy, pb.SandboxRef(sandbox_id=sandbox_id))

    def restore(self, snapshot_id: str, *, labels: dict[str, str] | None = None, timeout_s: float = 0.0) -> Sandbox:
        return Sandbox.restore(snapshot_id, client=self, labels=labels, timeout_s=timeout_s)

    def snapshots(self, sandbox_id: str = "") -> list[SnapshotInfo]:
        """The caller's snapshots (of one sandbox, or all), oldest first, with their size on disk."""
        reply = self.rpc(self.sandboxes.ListSnapshots, pb.ListSnapshotsRequest(sandbox_id=sandbox_id))
        return [wire.from_pb_as(SnapshotInfo, snapshot) for snapshot in reply.snapshots]

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Free a snapshot's disk; restores already under way from it still finish."""
        self.rpc(self.sandboxes.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=snapshot_id))

    def push_snapshot(self, snapshot_id: str, ref: str) -> PushedSnapshot:
        """Push one of your snapshots to an OCI registry as `ref` (host[:port]/repo[:tag]); its base image goes to
        the same repository. Chunks the registry already has are not sent again."""
        return push_snapshot(self, snapshot_id, ref)

    def pull_snapshot(self, ref: str) -> SnapshotInfo:
        """Pull a pushed snapshot (and its base image when this node lacks it) as a new snapshot of yours; restore
        it with `client.restore(info.snapshot_id)`. All blobs are verified; a failed pull leaves nothing."""
        return pull_snapshot(self, ref)

    def snapshots_gc(self) -> list[CollectedSnapshot]:
        """Run one snapshot GC pass over the caller's snapshots now; what it removed and why."""
        return collect_snapshots(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


set_default_factory(Client)


def default_client() -> Client:
    """The process-wide client used when none is passed (created on first use; `Sandbox.create()` uses the same)."""
    client = default_connection()
    assert isinstance(client, Client), "set_default_factory(Client) runs when this module is imported"
    return client
