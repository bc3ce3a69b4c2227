"""`dsec images ls|rm|tag|prune|du|import|export|build|pull|push`: direct on this node's store.

The store is node-local and process-safe, so the CLI opens it directly (no server needed, and it sees the
same images every server on this machine serves).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dsec.config import ServerConfig
from dsec.images import gc, registry
from dsec.images.build import build, parse_dockerfile
from dsec.images.export import export_docker_archive, export_oci_layout
from dsec.images.local import run_driver
from dsec.images.store import ImageRecord, LayerStore


def _store() -> LayerStore:
    config = ServerConfig()
    return LayerStore(config.images_dir, config.layer_format)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _row(record: ImageRecord) -> str:
    age = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created))
    return f"{record.digest[7:19]}  {','.join(record.tags) or '<none>':30}  {len(record.layers):>2} layers  {_mb(record.size):>10}  {age}  held:{record.holders}"


def cmd_ls(args: argparse.Namespace) -> int:
    for record in _store().list():
        print(_row(record))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = _store()
    for ref in args.refs:
        removed = store.remove(ref)
        print(f"{ref}: " + (f"deleted {', '.join(removed)}" if removed else "untagged"))
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    print(_row(_store().tag(args.ref, args.new_tag)))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    budget = int(args.budget_mb * 1e6) if args.budget_mb is not None else None
    result = gc.prune(_store(), budget_bytes=budget)
    print(f"removed {len(result.images_removed)} images, {len(result.layers_removed)} layers, "
          f"{result.blobs_removed} blobs; freed {_mb(result.bytes_freed)}")
    return 0


def cmd_du(args: argparse.Namespace) -> int:
    du = gc.disk_usage(_store())
    print(f"images {du.images} (held {du.held_images})  layers {du.layers}  extracted {_mb(du.layer_bytes)}  "
          f"blobs {_mb(du.blob_bytes)}  partial {_mb(du.partial_bytes)}  total {_mb(du.total_bytes)}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    store, path = _store(), Path(args.path)
    fmt = args.format or ("oci" if path.is_dir() else "docker-archive")
    record = store.import_oci_layout(path, args.tag) if fmt == "oci" else store.import_docker_archive(path, args.tag)
    print(_row(record))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    exporter = export_oci_layout if args.format == "oci" else export_docker_archive
    print(exporter(_store(), args.ref, Path(args.path)))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    context = Path(args.context)
    dockerfile = Path(args.file) if args.file else context / "Dockerfile"
    result = build(_store(), parse_dockerfile(dockerfile.read_text()), tag=args.tag, context=context, run_driver=run_driver)
    print(f"{_row(result.record)}\n{result.steps_run} steps run, {result.steps_cached} cached")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    print(_row(registry.pull(_store(), args.ref, tag=args.tag, lazy=not args.eager)))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    print(registry.push(_store(), args.ref, args.dest))
    return 0


def add_images_commands(subparsers: argparse._SubParsersAction) -> None:
    """Attach `dsec images …` to the main CLI's subparsers (called by dsec.cli.build_parser)."""
    images = subparsers.add_parser("images", help="manage this node's image store")
    sub = images.add_subparsers(dest="images_command", required=True)
    sub.add_parser("ls", help="list images").set_defaults(func=cmd_ls)
    rm = sub.add_parser("rm", help="untag or delete images")
    rm.add_argument("refs", nargs="+")
    rm.set_defaults(func=cmd_rm)
    tag = sub.add_parser("tag", help="add a tag")
    tag.add_argument("ref")
    tag.add_argument("new_tag")
    tag.set_defaults(func=cmd_tag)
    prune = sub.add_parser("prune", help="free unreferenced layers (and LRU images beyond a budget)")
    prune.add_argument("--budget-mb", type=float, default=None)
    prune.set_defaults(func=cmd_prune)
    sub.add_parser("du", help="disk usage").set_defaults(func=cmd_du)
    imp = sub.add_parser("import", help="import an OCI layout dir or docker-save tar")
    imp.add_argument("path")
    imp.add_argument("--format", choices=["oci", "docker-archive"], default="")
    imp.add_argument("--tag", default=None)
    imp.set_defaults(func=cmd_import)
    exp = sub.add_parser("export", help="export as an OCI layout dir or docker-save tar")
    exp.add_argument("ref")
    exp.add_argument("path")
    exp.add_argument("--format", choices=["oci", "docker-archive"], default="oci")
    exp.set_defaults(func=cmd_export)
    bld = sub.add_parser("build", help="build from a Dockerfile subset (FROM RUN COPY ENV WORKDIR USER)")
    bld.add_argument("context")
    bld.add_argument("-f", "--file", default=None)
    bld.add_argument("-t", "--tag", default=None)
    bld.set_defaults(func=cmd_build)
    pull = sub.add_parser("pull", help="pull from a registry (layers fetched on first use)")
    pull.add_argument("ref")
    pull.add_argument("--tag", default=None)
    pull.add_argument("--eager", action="store_true")
    pull.set_defaults(func=cmd_pull)
    push = sub.add_parser("push", help="push to a registry")
    push.add_argument("ref")
    push.add_argument("dest")
    push.set_defaults(func=cmd_push)
