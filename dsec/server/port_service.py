"""PortService: a TCP connection to a port inside a sandbox, relayed over one bidi gRPC stream.

The sandbox end (port_ends.py) is a socket the host creates in a container's network namespace (nothing runs
in the sandbox, nothing listens on the host, a sandbox without network is reachable all the same), or, in a
VM, a relay process started through the agent. See docs/ports.md.

Stream shape: the client's first message names sandbox + port; the server answers `opened` once connected (or
a typed error: PortUnreachable when nothing accepts connections), then bytes flow both ways. `close_write`
(or the end of the client's stream) half-closes the sandbox side; the RPC ends when the sandbox side has
closed and the client has stopped sending, or when the client cancels. The connection is closed in every case.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import grpc

from dsec.errors import DsecError, InvalidSpec
from dsec.server.auth import Authenticator
from dsec.server.errors import rpc_errors
from dsec.server.manager import SandboxManager
from dsec.server.metrics import PORT_BYTES, PORT_CONNECTIONS
from dsec.server.port_ends import SandboxEnd, open_end
from dsec.v1 import ports_pb2 as ppb
from dsec.v1 import ports_pb2_grpc as ppb_grpc

log = logging.getLogger("dsec.server.ports")


def _pump_to_sandbox(requests: Iterator[ppb.PortChunk], end: SandboxEnd, done: threading.Event) -> None:
    """Client → sandbox. The end of the client's stream or `close_write` half-closes the sandbox side."""
    try:
        for message in requests:
            kind = message.WhichOneof("kind")
            if kind == "data":
                end.send(message.data)
                PORT_BYTES.labels("in").inc(len(message.data))
            elif kind == "close_write":
                break
            else:
                log.warning("ForwardPort: unexpected %s message after the stream was opened; closing", kind)
                end.close()
                return
        end.close_write()
        for _ in requests:  # drain until the client ends its stream or cancels; no more data may follow
            pass
    except (OSError, grpc.RpcError, ValueError, DsecError):
        pass  # the sandbox side reset the connection, or the client went away: the reader ends the RPC
    finally:
        done.set()


class PortService(ppb_grpc.PortServiceServicer):
    def __init__(self, manager: SandboxManager, auth: Authenticator | None = None) -> None:
        self.manager = manager
        self.auth = auth or Authenticator({})

    @rpc_errors
    def ForwardPort(self, request_iterator: Iterator[ppb.PortChunk], context: grpc.ServicerContext) -> Iterator[ppb.PortChunk]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "open":
            raise InvalidSpec("ForwardPort stream must start with an `open` message naming sandbox_id and port")
        sandbox_id, port = first.open.sandbox_id, first.open.port
        if not 0 < port < 65536:
            raise InvalidSpec(f"port must be 1..65535, got {port}")
        try:
            sandbox = self.manager.running(sandbox_id, self.auth.tenant(context))
            end = open_end(sandbox.handle, port, sandbox_id)
        except DsecError as exc:
            PORT_CONNECTIONS.labels(type(exc).__name__).inc()
            raise
        PORT_CONNECTIONS.labels("opened").inc()
        log.debug("sandbox %s: port %d connected", sandbox_id, port)
        context.add_callback(end.close)  # the client cancelled or the RPC ended: the reads below end
        client_done = threading.Event()
        writer = threading.Thread(
            target=_pump_to_sandbox, args=(request_iterator, end, client_done), name=f"dsec-port-{sandbox_id}", daemon=True
        )
        writer.start()
        try:
            yield ppb.PortChunk(opened=ppb.PortOpened())
            for data in end.chunks():
                PORT_BYTES.labels("out").inc(len(data))
                yield ppb.PortChunk(data=data)
            if context.is_active():
                yield ppb.PortChunk(close_write=True)
                while not client_done.wait(1.0) and context.is_active():
                    pass  # TCP half-close: the client may still be sending
        finally:
            end.close()


def add_port_service(server: grpc.Server, manager: SandboxManager, auth: Authenticator | None = None) -> None:
    ppb_grpc.add_PortServiceServicer_to_server(PortService(manager, auth), server)
