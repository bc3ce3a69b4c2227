"""`client.push_snapshot` / `client.pull_snapshot`: snapshots through an OCI registry, so a sandbox snapshotted on
one node restores on another (docs/lifecycle.md "Portable snapshots")."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsec import wire
from dsec.models import PushedSnapshot, SnapshotInfo
from dsec.v1 import snapshot_registry_pb2 as spb
from dsec.v1 import snapshot_registry_pb2_grpc as spb_grpc

if TYPE_CHECKING:
    from dsec.sdk.client import Client

TIMEOUT_S = 1800.0  # a VM snapshot is hundreds of MB of chunks to compress and send


def push_snapshot(client: Client, snapshot_id: str, ref: str) -> PushedSnapshot:
    stub = spb_grpc.SnapshotRegistryStub(client.channel)
    reply = client.rpc(stub.Push, spb.PushSnapshotRequest(snapshot_id=snapshot_id, ref=ref), timeout=TIMEOUT_S)
    return wire.from_pb_as(PushedSnapshot, reply)


def pull_snapshot(client: Client, ref: str) -> SnapshotInfo:
    stub = spb_grpc.SnapshotRegistryStub(client.channel)
    return wire.from_pb_as(SnapshotInfo, client.rpc(stub.Pull, spb.PullSnapshotRequest(ref=ref), timeout=TIMEOUT_S))
