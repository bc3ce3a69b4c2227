"""`dsec templates ls|create|rm` and `dsec snapshots gc`: ready templates and the snapshot GC from a shell."""

from __future__ import annotations

import argparse
import shlex
import time
from collections.abc import Callable
from typing import Any


def _cmd_ls(client: Any, args: argparse.Namespace) -> int:
    print(f"{'TEMPLATE':<24} {'SUBSTRATE':<10} {'IMAGE':<16} {'SNAPSHOT':<12} {'BUILD':>8}  START")
    for t in client.templates.list():
        print(f"{t.name:<24} {t.substrate:<10} {t.image[:16]:<16} {t.snapshot_kind:<12} {t.build_ms / 1000:>7.1f}s  "
              f"{shlex.join(t.start)}")
    return 0


def _cmd_create(client: Any, args: argparse.Namespace) -> int:
    if bool(args.ready_port) == bool(args.ready_cmd):
        raise SystemExit("dsec templates create: give exactly one of --ready-port or --ready-cmd")
    probe: dict = {"tcp_port": args.ready_port} if args.ready_port else {"command": shlex.split(args.ready_cmd)}
    probe["timeout_s"] = args.ready_timeout
    start = None if args.start is None else shlex.split(args.start)
    info = client.templates.create(args.name, image=args.image, substrate=args.substrate, driver=args.driver,
                                   start=start, ready=probe)
    print(f"{info.name} {info.snapshot_id} ({info.snapshot_kind}) built in {info.build_ms / 1000:.1f}s")
    return 0


def _cmd_rm(client: Any, args: argparse.Namespace) -> int:
    for name in args.names:
        client.templates.delete(name)
        print(name)
    return 0


def _cmd_gc(client: Any, args: argparse.Namespace) -> int:
    removed = client.snapshots_gc()
    for item in removed:
        print(f"{item.snapshot_id:<22} {item.reason:<14} {item.size_bytes / 1e6:>7.1f}MB")
    print(f"removed {len(removed)} snapshots, {sum(i.size_bytes for i in removed) / 1e6:.1f}MB at {time.strftime('%H:%M:%S')}")
    return 0


def add_template_commands(sub: argparse._SubParsersAction, snapshots: argparse._SubParsersAction,
                          client: Callable[[argparse.Namespace], Any]) -> None:
    """Register the commands; `client(args)` connects as the other commands do."""

    def run(command: Callable[[Any, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        return lambda args: command(client(args), args)

    templates = sub.add_parser("templates", help="ready templates").add_subparsers(dest="what", required=True)
    ls = templates.add_parser("ls", help="list your templates")
    ls.set_defaults(func=run(_cmd_ls))
    create = templates.add_parser("create", help="build a template: start, wait until ready, snapshot")
    create.add_argument("name")
    create.add_argument("--image", required=True)
    create.add_argument("--substrate", default="container")
    create.add_argument("--driver", default="")
    create.add_argument("--start", default=None, help="start command (shell words); default the image's label")
    create.add_argument("--ready-port", type=int, default=0, help="ready once this port accepts connections")
    create.add_argument("--ready-cmd", default="", help="ready once this command exits 0")
    create.add_argument("--ready-timeout", type=float, default=60.0)
    create.set_defaults(func=run(_cmd_create))
    rm = templates.add_parser("rm", help="delete templates (and their snapshots)")
    rm.add_argument("names", nargs="+")
    rm.set_defaults(func=run(_cmd_rm))

    gc = snapshots.add_parser("gc", help="run one snapshot GC pass now over your snapshots")
    gc.set_defaults(func=run(_cmd_gc))
