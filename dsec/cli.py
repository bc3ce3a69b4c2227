"""`dsec` command line: serve, run, exec, ls, rm, snapshots, images."""

from __future__ import annotations

import argparse
import os
import sys
import time

from dsec.substrates import registry

DEFAULT_SERVER = "127.0.0.1:50551"


def _client(args: argparse.Namespace, embedded_ok: bool = False):
    from dsec.sdk.client import Client

    address = args.address or os.environ.get("DSEC_ADDRESS")
    if not address and not embedded_ok:
        address = DEFAULT_SERVER  # `dsec serve`'s default: exec/ls/rm need a server that outlives this command
    return Client(address)


def _print_result(result) -> int:
    sys.stdout.buffer.write(result.stdout)
    sys.stderr.buffer.write(result.stderr)
    if result.timed_out:
        print(f"dsec: timed out after {result.duration_s:.1f}s", file=sys.stderr)
        return 124
    return result.exit_code if result.exit_code >= 0 else 128 + result.signal


def cmd_run(args: argparse.Namespace) -> int:
    """Create a sandbox, run one command, destroy it (with an embedded server unless --address)."""
    client = _client(args, embedded_ok=True)
    started = time.monotonic()
    options = {"timeout_s": args.ttl, "network": args.network}
    if args.memory_mb:
        options["memory_mb"] = args.memory_mb
    with client.create(args.image, args.substrate, driver=args.driver, **options) as sandbox:
        command = args.command[0] if len(args.command) == 1 else args.command
        code = _print_result(sandbox.exec(command, timeout=args.timeout))
    if args.verbose:
        print(f"dsec: {time.monotonic() - started:.3f}s total", file=sys.stderr)
    client.close()
    return code


def cmd_exec(args: argparse.Namespace) -> int:
    client = _client(args)
    sandbox = client.connect(args.sandbox_id)
    command = args.command[0] if len(args.command) == 1 else args.command
    return _print_result(sandbox.exec(command, timeout=args.timeout))


def cmd_ls(args: argparse.Namespace) -> int:
    client = _client(args)
    labels = dict(item.split("=", 1) for item in args.label)
    print(f"{'ID':<22} {'SUBSTRATE':<10} {'DRIVER':<14} {'IMAGE':<16} {'STATE':<9} EXPIRES IN")
    for info in client.list(labels):
        print(
            f"{info.id:<22} {info.spec.substrate:<10} {info.driver:<14} {info.spec.image[:16]:<16} "
            f"{info.state:<9} {max(info.expires_at - time.time(), 0):.0f}s"
        )
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    client = _client(args)
    for sandbox_id in args.sandbox_ids:
        client.destroy(sandbox_id)
        print(sandbox_id)
    return 0


def cmd_snapshots_ls(args: argparse.Namespace) -> int:
    client = _client(args)
    print(f"{'SNAPSHOT':<22} {'SANDBOX':<22} {'KIND':<11} {'SIZE':>9}  AGE    NAME")
    for ref in client.snapshots(args.sandbox):
        print(
            f"{ref.snapshot_id:<22} {ref.sandbox_id:<22} {ref.kind:<11} {ref.size_bytes / 1e6:>7.1f}MB "
            f"{time.time() - ref.created_at:>5.0f}s  {ref.name}"
        )
    return 0


def cmd_snapshots_rm(args: argparse.Namespace) -> int:
    client = _client(args)
    for snapshot_id in args.snapshot_ids:
        client.delete_snapshot(snapshot_id)
        print(snapshot_id)
    return 0


def cmd_serve(args: argparse.Namespace, rest: list[str]) -> int:
    from dsec.server.main import main as serve_main

    return serve_main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsec", description="dsec sandboxes from the command line")
    parser.add_argument("--address", default=None, help=f"server address (default $DSEC_ADDRESS, else {DEFAULT_SERVER})")
    sub = parser.add_subparsers(dest="cmd", required=True)

    sub.add_parser("serve", help="run a server (see `dsec serve --help`)", add_help=False)

    run = sub.add_parser("run", help="run one command in a fresh sandbox")
    run.add_argument("--image", default="busybox")
    run.add_argument("--substrate", default="container", choices=registry.names())
    run.add_argument("--driver", default="")
    run.add_argument("--timeout", type=float, default=None, help="command timeout (s)")
    run.add_argument("--ttl", type=float, default=600.0, help="sandbox time to live (s)")
    run.add_argument("--memory-mb", type=int, default=0)
    run.add_argument("--network", action="store_true")
    run.add_argument("-v", "--verbose", action="store_true")
    run.add_argument("command", nargs=argparse.REMAINDER)
    run.set_defaults(func=cmd_run)

    exe = sub.add_parser("exec", help="run a command in a live sandbox")
    exe.add_argument("sandbox_id")
    exe.add_argument("--timeout", type=float, default=None)
    exe.add_argument("command", nargs=argparse.REMAINDER)
    exe.set_defaults(func=cmd_exec)

    ls = sub.add_parser("ls", help="list sandboxes")
    ls.add_argument("--label", action="append", default=[], help="KEY=VALUE filter")
    ls.set_defaults(func=cmd_ls)

    rm = sub.add_parser("rm", help="destroy sandboxes")
    rm.add_argument("sandbox_ids", nargs="+")
    rm.set_defaults(func=cmd_rm)

    snapshots = sub.add_parser("snapshots", help="list or delete snapshots").add_subparsers(dest="what", required=True)
    snap_ls = snapshots.add_parser("ls", help="list snapshots (yours, oldest first)")
    snap_ls.add_argument("--sandbox", default="", help="only those of this sandbox")
    snap_ls.set_defaults(func=cmd_snapshots_ls)
    snap_rm = snapshots.add_parser("rm", help="delete snapshots")
    snap_rm.add_argument("snapshot_ids", nargs="+")
    snap_rm.set_defaults(func=cmd_snapshots_rm)

    from dsec.snapshots_cli import add_snapshot_registry_commands
    from dsec.templates_cli import add_template_commands

    add_template_commands(sub, snapshots, _client)
    add_snapshot_registry_commands(snapshots, _client)

    try:
        from dsec.images.cli import add_images_commands
    except ImportError:
        add_images_commands = None
    if add_images_commands is not None:
        add_images_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return cmd_serve(argparse.Namespace(), argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) is not None:
        if args.command[:1] == ["--"]:
            args.command = args.command[1:]
        if not args.command:
            parser.error("give a command to run")
    from dsec.errors import DsecError

    try:
        return args.func(args)
    except DsecError as error:
        print(f"dsec: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
