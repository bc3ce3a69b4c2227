"""`dsec snapshots push|pull`: snapshots through an OCI registry (docs/lifecycle.md "Portable snapshots")."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def _cmd_push(client: Any, args: argparse.Namespace) -> int:
    done = client.push_snapshot(args.snapshot_id, args.ref)
    print(f"{args.ref} {done.digest}")
    print(f"uploaded {done.blobs_uploaded} blobs ({done.bytes_uploaded / 1e6:.1f}MB), "
          f"{done.blobs_present} already there; base image {done.image_digest}")
    return 0


def _cmd_pull(client: Any, args: argparse.Namespace) -> int:
    info = client.pull_snapshot(args.ref)
    print(f"{info.snapshot_id} {info.kind} {info.size_bytes / 1e6:.1f}MB (restore: client.restore(snapshot_id))")
    return 0


def add_snapshot_registry_commands(snapshots: argparse._SubParsersAction,
                                   client: Callable[[argparse.Namespace], Any]) -> None:
    """Register the commands; `client(args)` connects as the other commands do."""
    push = snapshots.add_parser("push", help="push a snapshot to an OCI registry")
    push.add_argument("snapshot_id")
    push.add_argument("ref", help="host[:port]/repository[:tag]")
    push.set_defaults(func=lambda args: _cmd_push(client(args), args))
    pull = snapshots.add_parser("pull", help="pull a snapshot from an OCI registry (a new snapshot id here)")
    pull.add_argument("ref", help="host[:port]/repository[:tag][@sha256:…]")
    pull.set_defaults(func=lambda args: _cmd_pull(client(args), args))
