"""Serve the front door with uvicorn in a background thread, started and stopped with the gRPC server.

The socket is bound here, before the thread starts, so a taken port fails `dsec serve` at once with a clear
error and `127.0.0.1:0` reports the port it got; the ready line is printed only once uvicorn accepts.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

import grpc
import uvicorn

from dsec.compat.context import CompatContext, OwnerLookup
from dsec.compat.front_door import make_app

log = logging.getLogger("dsec.compat")

START_TIMEOUT_S = 30.0
MAX_HEADER_BYTES = 64 << 10


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) → (host, port); a clear ValueError for anything else."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--http-listen {listen!r}: expected HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class HttpDoor:
    """A running front door: `.address` is `host:port`, `.url` the `http://` URL clients use."""

    def __init__(self, listen: str, backend_address: str, tls: grpc.ChannelCredentials | None = None,
                 owner_of: OwnerLookup | None = None) -> None:
        host, port = parse_listen(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on accepted sockets whose proto says TCP; with
        # proto 0 Nagle held each response's body behind its headers for the client's delayed ACK (~40 ms a call)
        self._sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise RuntimeError(f"--http-listen {listen}: cannot bind: {exc}") from exc
        self._sock.listen(1024)
        self._sock.set_inheritable(False)
        bound_port = self._sock.getsockname()[1]
        self.address = f"[{host}]:{bound_port}" if family == socket.AF_INET6 else f"{host}:{bound_port}"
        self.url = f"http://{self.address}"
        self.ctx = CompatContext(backend_address=backend_address, tls=tls, owner_of=owner_of)
        config = uvicorn.Config(
            make_app(self.ctx),
            lifespan="on",
            log_level="warning",
            access_log=False,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            timeout_graceful_shutdown=5,
            ws_ping_interval=None,
            server_header=False,  # the port proxy relays the sandbox server's own Server and Date headers:
            date_header=False,  # uvicorn's would duplicate them
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="dsec-http", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            log.exception("compat: HTTP front door stopped with an error")

    def start(self) -> HttpDoor:
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(START_TIMEOUT_S / 0.01)):
            if self._server.started or not self._thread.is_alive():
                break
            deadline.wait(0.01)
        if not self._server.started:
            self.stop()
            raise RuntimeError(f"HTTP front door on {self.address} did not start: {self._error!r}")
        log.info("compat: HTTP front door on %s → dsec gRPC %s", self.url, self.ctx.backend_address)
        return self

    def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close the socket. Safe to call twice."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(START_TIMEOUT_S)
        self._sock.close()


def start_http_door(listen: str, backend_address: str, tls: grpc.ChannelCredentials | None = None,
                    owner_of: OwnerLookup | None = None) -> HttpDoor:
    return HttpDoor(listen, backend_address, tls, owner_of).start()
