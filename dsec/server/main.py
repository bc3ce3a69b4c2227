"""Start a dsec server: `dsec serve` / `python -m dsec.server.main`, or embedded by the SDK.

A server owns a run directory (for crash cleanup), re-adopts the healthy sandboxes dead servers left and cleans
the rest (readopt.py), serves the sandbox, image and trajectory services on one gRPC port (TCP or a unix socket),
and destroys its sandboxes on SIGTERM/SIGINT or when its parent (embedded mode) dies.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc

from dsec.config import ServerConfig, parse_pool
from dsec.errors import DsecError
from dsec.images.store import LayerStore
from dsec.server.auth import Authenticator, AuthInterceptor, load_tokens, server_credentials
from dsec.server.drivers import DriverRegistry
from dsec.server.filesystem_service import add_filesystem_service
from dsec.server.image_service import add_image_service
from dsec.server.volume_service import add_volume_service
from dsec.server.launch import HTTP_READY_PREFIX, READY_PREFIX
from dsec.server.logs import configure_logging
from dsec.server.manager import SandboxManager
from dsec.server.metrics import start_metrics_server
from dsec.server.port_service import add_port_service
from dsec.server.process_service import add_process_service
from dsec.server.sandbox_service import SandboxService
from dsec.server.state import claim_run_dir
from dsec.server.snapshot_registry_service import add_snapshot_registry_service
from dsec.server.template_service import add_template_services
from dsec.server.trajectory_service import add_trajectory_service
from dsec.substrates import registry
from dsec.trajectory.coordinator import StepCoordinator, open_log
from dsec.v1 import sandbox_pb2_grpc as pb_grpc

log = logging.getLogger("dsec.server")
SIGNAL_POLL_S = 0.5  # how often the main thread looks for signal handlers to run while it serves

MAX_MESSAGE = 64 << 20
# sandbox id -> (its labels, a key of its owner; None with auth off), or None: compat.context.OwnerLookup's shape
SandboxOwner = Callable[[str], "tuple[dict[str, str], str | None] | None"]


@dataclass
class RunningServer:
    server: grpc.Server
    manager: SandboxManager
    address: str
    config: ServerConfig
    metrics_http: object | None  # the /metrics HTTP server, when enabled
    trajectory_log: object | None  # closed last, after every in-flight step has been logged
    _stopped: threading.Event
    _done: threading.Event
    http_door: object | None = None  # the E2B/SandboxFusion front door (dsec.compat), when enabled

    def stop(self, grace: float = 2.0) -> None:
        """Stop serving, destroy every sandbox, release the run directory. Safe to call twice."""
        if self._stopped.is_set():
            self._done.wait()
            return
        self._stopped.set()
        try:
            if self.http_door is not None:
                self.http_door.stop()  # first: it is a client of the gRPC server
            self.server.stop(grace)
            if self.metrics_http is not None:
                self.metrics_http.shutdown()
            self.manager.shutdown()
            if self.trajectory_log is not None:
                self.trajectory_log.close()
            self.manager.state.release()
        finally:
            self._done.set()

    def wait(self) -> None:
        # Wake up now and then: a SIGTERM the kernel hands to another thread only flags the main thread, which
        # runs Python's handler when it next runs bytecode; an untimed wait would sleep through it (seen: two
        # servers ignored SIGTERM for 120 s and stopped at once on a second one).
        while not self._done.wait(SIGNAL_POLL_S):
            pass


def _open_image_store(config: ServerConfig):
    return LayerStore(config.images_dir, config.layer_format)


def _open_step_coordinator(config: ServerConfig):
    trajectory_log = open_log(config)
    return StepCoordinator(trajectory_log), trajectory_log


def _add_optional_services(server: grpc.Server, images, trajectory_log, auth: Authenticator | None = None) -> None:
    if images is not None:
        add_image_service(server, images)
    if trajectory_log is not None:
        add_trajectory_service(server, trajectory_log, auth)  # auth scopes trajectory ids per tenant


def serve(config: ServerConfig) -> RunningServer:
    """Start serving in background threads; returns once the port is bound and old leftovers are cleaned."""
    for path in (config.home, config.run_root, config.images_dir):
        path.mkdir(parents=True, exist_ok=True)
    state = claim_run_dir(config.run_root)
    images = _open_image_store(config)
    manager = SandboxManager(config, state, images, DriverRegistry(config))
    manager.reap_dead_servers()
    manager.start_pools()
    steps, trajectory_log = _open_step_coordinator(config)
    auth = Authenticator(load_tokens(config.tokens_file, config.tokens))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="dsec-rpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=config.workers * 16,
        # an open server has nothing to check: no interceptor on every call's path (tokens are fixed at start)
        interceptors=[AuthInterceptor(auth)] if auth.enabled else [],
    )
    pb_grpc.add_SandboxServiceServicer_to_server(SandboxService(config, manager, steps, auth), server)
    add_port_service(server, manager, auth)
    add_process_service(server, manager, auth)
    add_filesystem_service(server, manager, auth)
    add_volume_service(server, manager.volumes, auth)
    add_template_services(server, manager, auth)
    add_snapshot_registry_service(server, manager, auth)
    _add_optional_services(server, images, trajectory_log, auth)
    listen = config.listen
    if config.tls_cert and config.tls_key:
        port = server.add_secure_port(listen, server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca))
    else:
        port = server.add_insecure_port(listen)
    if listen.startswith("unix:"):
        address = listen
    else:
        if port == 0:
            raise RuntimeError(f"could not bind {listen}")
        address = f"{listen.rsplit(':', 1)[0]}:{port}"
    server.start()
    metrics_http = None
    if config.metrics_listen:
        metrics_http = start_metrics_server(config.metrics_listen, manager)
    try:
        http_door = _start_http_door(config, address, _sandbox_owner(manager, auth)) if config.http_listen else None
    except BaseException:
        server.stop(0)
        if metrics_http is not None:
            metrics_http.shutdown()
        manager.shutdown()
        if trajectory_log is not None:
            trajectory_log.close()
        state.release()
        raise
    log.info(
        "dsec server %s listening on %s (home %s, auth %s, metrics %s, http %s)",
        state.server_id,
        address,
        config.home,
        "on" if auth.enabled else "off",
        metrics_http.server_port if metrics_http else "off",
        http_door.url if http_door else "off",
    )
    return RunningServer(server, manager, address, config, metrics_http, trajectory_log, threading.Event(), threading.Event(),
                         http_door=http_door)


def _sandbox_owner(manager: SandboxManager, auth: Authenticator) -> SandboxOwner:
    """For the front door in this process: a sandbox's labels and a key of the tenant that owns it (None with auth
    off), or None when there is no such sandbox. E2B's envd and port requests carry no API key; a door that did not
    see the sandbox's create (it restarted since) asks this instead of losing access (compat/front_door.py)."""

    def owner_of(sandbox_id: str) -> tuple[dict[str, str], str | None] | None:
        try:
            sandbox = manager.get(sandbox_id)
        except DsecError:
            return None
        return dict(sandbox.spec.labels), auth.token_of(sandbox.tenant) if auth.enabled else None

    return owner_of


def _start_http_door(config: ServerConfig, address: str, owner_of: SandboxOwner | None = None):
    """The HTTP front door is a gRPC client of this server (same auth, admission, metrics, logs)."""
    # function-level: the door (dsec.compat, a layer above: a client of this server) loads starlette, uvicorn and
    # connectrpc, which a server started without --http-listen never needs (tests/test_layering.py FUNCTION_LEVEL)
    from dsec.compat.http_server import start_http_door

    tls = None
    if config.tls_cert and config.tls_key:
        if config.tls_client_ca:
            raise RuntimeError("--http-listen with --tls-client-ca (mTLS) is not supported: the door has no client certificate")
        tls = grpc.ssl_channel_credentials(root_certificates=config.tls_cert.read_bytes())
    return start_http_door(config.http_listen, address, tls, owner_of)


def _watch_parent(parent_pid: int, running: RunningServer) -> None:
    """Embedded mode: when the SDK process that started us dies (even by kill -9), shut down cleanly."""
    while not running._stopped.wait(0.5):
        if os.getppid() != parent_pid:
            log.warning("parent %d is gone; shutting down", parent_pid)
            running.stop()
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsec serve", description="Run a dsec sandbox server.")
    parser.add_argument("--listen", default=os.environ.get("DSEC_LISTEN", "127.0.0.1:50551"))
    parser.add_argument("--home", default=None, help="state directory (default $DSEC_HOME)")
    parser.add_argument("--container-driver", default=None, choices=sorted(registry.get("container").drivers))
    parser.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default=os.environ.get("DSEC_LOG_LEVEL", "INFO"))
    parser.add_argument("--log-format", default=os.environ.get("DSEC_LOG_FORMAT", "text"), choices=["text", "json"])
    parser.add_argument("--metrics-listen", default=os.environ.get("DSEC_METRICS_LISTEN", ""), help="host:port for /metrics")
    parser.add_argument("--http-listen", default=os.environ.get("DSEC_HTTP_LISTEN", ""),
                        help="host:port for the E2B/SandboxFusion-compatible HTTP front door (docs/compat.md)")
    parser.add_argument("--tokens-file", default=None, help="YAML {token: tenant}; enables token auth")
    parser.add_argument("--tls-cert", default=None)
    parser.add_argument("--tls-key", default=None)
    parser.add_argument("--tls-client-ca", default=None, help="require client certificates signed by this CA (mTLS)")
    parser.add_argument("--max-sandboxes", type=int, default=None)
    parser.add_argument("--tenant-max-sandboxes", type=int, default=None)
    parser.add_argument("--no-readopt", action="store_true",
                        help="reap every sandbox a dead server left instead of re-attaching the healthy ones")
    parser.add_argument("--pool", action="append", default=[], type=parse_pool, metavar="image=IMG,size=N[,substrate=,driver=,memory_mb=…]",
                        help="keep N ready sandboxes of this shape (warm pool; docs/lifecycle.md); repeatable")
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    overrides: dict = {"listen": args.listen, "parent_pid": args.parent_pid, "metrics_listen": args.metrics_listen,
                       "http_listen": args.http_listen}
    for name in ("tokens_file", "tls_cert", "tls_key", "tls_client_ca", "max_sandboxes", "tenant_max_sandboxes"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.home:
        overrides["home"] = args.home
    if args.container_driver:
        overrides["container_driver"] = args.container_driver
    if args.pool:
        overrides["pools"] = args.pool
    if args.no_readopt:
        overrides["readopt"] = False
    config = ServerConfig(**overrides)
    try:
        running = serve(config)
    except (RuntimeError, ValueError) as exc:  # a port that cannot be bound, a malformed address: say so, no traceback
        log.error("dsec serve: %s", exc)
        return 2

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: destroying sandboxes and stopping", signum)
        threading.Thread(target=running.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, running), daemon=True).start()
    if running.http_door is not None:
        print(HTTP_READY_PREFIX + running.http_door.address, flush=True)  # before the ready line: launch reads both
    print(READY_PREFIX + running.address, flush=True)
    running.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
