"""The cluster gateway: one SandboxService endpoint in front of many node servers.

Why a gRPC proxy and not a client-side router: the SDK stays unchanged (`dsec.Client(gateway_address)`),
and placement sees every create. Create picks a node by free capacity (`placement.Placement`) and records
sandbox → node; every other call goes to the owning node, streams forwarded message by message; List
merges all nodes. Nodes enforce auth and tenancy themselves (the caller's metadata is passed through), so
the gateway holds no secrets. A node that stops answering is marked lost: its sandboxes show state "lost"
and calls on them fail with `SandboxStateError` naming the node, instead of hanging.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from dsec.cluster.placement import Capacity, Demand, Placement
from dsec.errors import (
    ERROR_METADATA_KEY,
    EXPIRED_REASON_METADATA_KEY,
    RETRY_AFTER_METADATA_KEY,
    CapacityExceeded,
    DsecError,
    InvalidSpec,
    SandboxExpired,
    SandboxNotFound,
    SandboxStateError,
    ServerUnavailable,
    SnapshotNotFound,
)
from dsec.v1 import filesystem_pb2 as fpb
from dsec.v1 import ports_pb2 as ppb
from dsec.v1 import process_pb2 as procpb
from dsec.v1 import sandbox_pb2 as pb
from dsec.v1 import sandbox_pb2_grpc as pb_grpc
from dsec.v1 import trajectory_pb2 as tpb

log = logging.getLogger("dsec.cluster.gateway")

MAX_MESSAGE = 64 << 20
DEFAULT_DEMAND = Demand(cpus=1.0, memory_mb=512)  # what a node fills in for zeros (models.Resources defaults)
_PASSED_METADATA = ("authorization",)
_RELAYED_TRAILERS = (ERROR_METADATA_KEY, RETRY_AFTER_METADATA_KEY, EXPIRED_REASON_METADATA_KEY)
F = TypeVar("F", bound=Callable[..., Any])


class _Relay(Exception):
    """A node's error status, passed to the caller unchanged (code, message, dsec-error trailer)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...]) -> None:
        super().__init__(details)
        self.code, self.details, self.trailers = code, details, trailers


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str, trailers) -> None:
    context.set_trailing_metadata(tuple(trailers))
    context.abort(code, details)


def _gateway_errors(method: F) -> F:
    """Map DsecError → typed status and relay node statuses as they came; anything else → INTERNAL."""

    def handle(context: grpc.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, _Relay):
            _abort(context, exc.code, exc.details, exc.trailers)
        elif isinstance(exc, DsecError):
            trailers = [(ERROR_METADATA_KEY, type(exc).__name__)]
            if "retry_after_s" in exc.details:
                trailers.append((RETRY_AFTER_METADATA_KEY, str(exc.details["retry_after_s"])))
            if isinstance(exc, SandboxExpired):
                trailers.append((EXPIRED_REASON_METADATA_KEY, exc.reason))
            _abort(context, exc.code, exc.message or type(exc).__name__, trailers)
        else:
            log.exception("gateway: internal error in %s", method.__name__)
            _abort(context, grpc.StatusCode.INTERNAL, f"gateway error in {method.__name__}: {exc!r}", [(ERROR_METADATA_KEY, "RuntimeFailure")])

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self, request, context):  # type: ignore[no-untyped-def]
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                handle(context, exc)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self, request, context):  # type: ignore[no-untyped-def]
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            handle(context, exc)

    return unary  # type: ignore[return-value]


@dataclass
class Node:
    """One node server as the gateway sees it."""

    node_id: str
    address: str
    capacity: Capacity
    channel: grpc.Channel = field(repr=False)
    stub: pb_grpc.SandboxServiceStub = field(repr=False)
    alive: bool = True
    failures: int = 0


@dataclass
class Route:
    node_id: str
    demand: Demand
    owner: str  # digest of the caller's authorization, so lost sandboxes are shown only to their tenant
    info: pb.SandboxInfo


NodeProbe = Callable[[Node], bool]


def channel_probe(node: Node, timeout_s: float = 2.0) -> bool:
    """A node is alive when its gRPC port accepts a connection within `timeout_s`."""
    try:
        grpc.channel_ready_future(node.channel).result(timeout=timeout_s)
        return True
    except grpc.FutureTimeoutError:
        return False


def _demand(spec: pb.SandboxSpec) -> Demand:
    return Demand(cpus=spec.resources.cpu or DEFAULT_DEMAND.cpus, memory_mb=spec.resources.memory_mb or DEFAULT_DEMAND.memory_mb)


def _owner(context: grpc.ServicerContext) -> str:
    auth = dict(context.invocation_metadata() or ()).get("authorization", "")
    return hashlib.sha256(auth.encode()).hexdigest()[:16]


def _outgoing(context: grpc.ServicerContext) -> list[tuple[str, str]]:
    return [(k, v) for k, v in context.invocation_metadata() or () if k in _PASSED_METADATA]


def _timeout(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e8 else None


class Gateway:
    """Routes SandboxService calls to node servers. Thread-safe; one lock guards routes and placement."""

    def __init__(self, probe: NodeProbe = channel_probe, failures_to_lose: int = 2) -> None:
        self.nodes: dict[str, Node] = {}
        self.routes: dict[str, Route] = {}
        self.snapshots: dict[str, str] = {}  # snapshot id → node id
        self.placement = Placement()
        self._probe = probe
        self._failures_to_lose = failures_to_lose
        self._lock = threading.Lock()

    # -- membership ----------------------------------------------------------------------------------------
    def add_node(self, node_id: str, address: str, capacity: Capacity) -> None:
        channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
        )
        with self._lock:
            self.nodes[node_id] = Node(node_id, address, capacity, channel, pb_grpc.SandboxServiceStub(channel))
            self.placement.add_node(node_id, capacity)
        log.info("node %s joined at %s with %s", node_id, address, capacity)

    def mark_lost(self, node_id: str, reason: str) -> list[str]:
        """Stop placing on a node and mark its sandboxes lost; returns their ids."""
        with self._lock:
            node = self.nodes.get(node_id)
            if node is None or not node.alive:
                return []
            node.alive = False
            self.placement.remove_node(node_id)
            lost = [sid for sid, route in self.routes.items() if route.node_id == node_id]
            for sid in lost:
                self.routes[sid].info.state = "lost"
        node.channel.close()
        log.warning("node %s lost (%s): %d sandboxes marked lost", node_id, reason, len(lost))
        return lost

    def check_nodes(self) -> None:
        """Probe every live node once; a node failing `failures_to_lose` probes in a row is lost."""
        for node in [n for n in self.nodes.values() if n.alive]:
            if self._probe(node):
                node.failures = 0
                continue
            node.failures += 1
            if node.failures >= self._failures_to_lose:
                self.mark_lost(node.node_id, f"{node.failures} failed health probes")

    def node_of(self, sandbox_id: str) -> str:
        with self._lock:
            route = self.routes.get(sandbox_id)
        if route is None:
            raise SandboxNotFound(f"sandbox {sandbox_id} is not known to this gateway")
        return route.node_id

    # -- forwarding ------------------------------------------------------------------------------------------
    def _call(self, node: Node, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return getattr(node.stub, method)(request, timeout=_timeout(context), metadata=_outgoing(context))
        except grpc.RpcError as exc:
            raise self._relay(node, exc) from None

    def _call_raw(self, node: Node, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return node.channel.unary_unary(method)(request, timeout=_timeout(context), metadata=_outgoing(context))
        except grpc.RpcError as exc:
            raise self._relay(node, exc) from None

    def _relay(self, node: Node, exc: grpc.RpcError) -> Exception:
        trailers = tuple((k, v) for k, v in (exc.trailing_metadata() or ()) if k in _RELAYED_TRAILERS)
        typed = any(k == ERROR_METADATA_KEY for k, _ in trailers)
        if exc.code() == grpc.StatusCode.UNAVAILABLE and not typed and not self._probe(node):
            self.mark_lost(node.node_id, f"unreachable: {exc.details()}")
            return SandboxExpired(f"node {node.node_id} ({node.address}) was lost; its sandboxes are gone — create a new one",
                                  reason="lost")
        return _Relay(exc.code(), exc.details() or exc.code().name, trailers)

    def _route(self, sandbox_id: str, context: grpc.ServicerContext) -> tuple[Node, Route | None]:
        """The live node owning `sandbox_id`; asks every node when the gateway has no record (e.g. restarted)."""
        if not sandbox_id:
            raise InvalidSpec("sandbox_id is required")
        with self._lock:
            route = self.routes.get(sandbox_id)
            node = self.nodes.get(route.node_id) if route else None
        if route is not None and node is not None:
            if not node.alive:
                raise SandboxExpired(
                    f"sandbox {sandbox_id} is lost: its node {node.node_id} ({node.address}) was lost; "
                    "create a new sandbox (a trajectory resumes there from its log)", reason="lost",
                )
            return node, route
        ended: grpc.RpcError | None = None
        for candidate in self._live_nodes():
            try:
                info = candidate.stub.Get(pb.SandboxRef(sandbox_id=sandbox_id), timeout=10, metadata=_outgoing(context))
            except grpc.RpcError as exc:
                if (ERROR_METADATA_KEY, "SandboxExpired") in tuple(exc.trailing_metadata() or ()):
                    ended = exc  # the node that ran it says why it ended (timeout, idle, destroyed)
                continue
            return candidate, self._record(candidate.node_id, info, _owner(context), charge=True)
        if ended is not None:
            raise _Relay(ended.code(), ended.details() or "sandbox expired",
                         tuple((k, v) for k, v in (ended.trailing_metadata() or ()) if k in _RELAYED_TRAILERS))
        raise SandboxNotFound(f"sandbox {sandbox_id} not found on any node")

    def _live_nodes(self) -> list[Node]:
        with self._lock:
            return [n for n in self.nodes.values() if n.alive]

    def _record(self, node_id: str, info: pb.SandboxInfo, owner: str, charge: bool) -> Route:
        demand = _demand(info.spec)
        with self._lock:
            existing = self.routes.get(info.id)
            if existing is not None:
                existing.info.CopyFrom(info)
                return existing
            route = self.routes[info.id] = Route(node_id, demand, owner, pb.SandboxInfo())
            route.info.CopyFrom(info)
            if charge:
                self.placement.charge(node_id, demand)
        return route

    def _forget(self, sandbox_id: str) -> None:
        with self._lock:
            route = self.routes.pop(sandbox_id, None)
            if route is not None:
                self.placement.release(route.node_id, route.demand)

    def _unary(self, sandbox_id: str, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        node, route = self._route(sandbox_id, context)
        try:
            return self._call(node, method, request, context)
        except _Relay as relay:
            if relay.code == grpc.StatusCode.NOT_FOUND and route is not None and route.owner == _owner(context):
                self._forget(sandbox_id)  # gone on its node (TTL, destroyed elsewhere): stop routing to it
            raise

    # -- lifecycle -----------------------------------------------------------------------------------------------
    @_gateway_errors
    def Create(self, request: pb.CreateRequest, context: grpc.ServicerContext) -> pb.SandboxInfo:
        demand = _demand(request.spec)
        tried: list[str] = []
        while True:
            with self._lock:
                try:
                    node_id = self.placement.place(demand)
                except CapacityExceeded:
                    if tried:
                        raise ServerUnavailable(f"no live node could create the sandbox (tried {', '.join(tried)})") from None
                    raise
                node = self.nodes[node_id]
            try:
                info = self._call(node, "Create", request, context)
            except SandboxStateError:  # the node was lost while we called it: place elsewhere
                tried.append(node_id)
                continue
            except BaseException:
                with self._lock:
                    self.placement.release(node_id, demand)
                raise
            route = self._record(node_id, info, _owner(context), charge=False)
            route.demand = demand
            return info

    def _lost_info(self, sandbox_id: str, context: grpc.ServicerContext) -> pb.SandboxInfo | None:
        """The last known info (state "lost") of a sandbox whose node is gone, shown only to its owner."""
        with self._lock:
            route = self.routes.get(sandbox_id)
            node = self.nodes.get(route.node_id) if route else None
        if route is None or node is None or node.alive:
            return None
        if route.owner != _owner(context):
            raise SandboxNotFound(f"sandbox {sandbox_id} not found")
        return route.info

    @_gateway_errors
    def Get(self, request: pb.SandboxRef, context: grpc.ServicerContext) -> pb.SandboxInfo:
        if (lost := self._lost_info(request.sandbox_id, context)) is not None:
            return lost
        try:
            info = self._unary(request.sandbox_id, "Get", request, context)
        except SandboxStateError:
            if (lost := self._lost_info(request.sandbox_id, context)) is not None:
                return lost  # the node was found lost by this very call
            raise
        self._record(self.node_of(request.sandbox_id), info, _owner(context), charge=False)
        return info

    @_gateway_errors
    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        merged = pb.ListResponse()
        for node in self._live_nodes():
            merged.sandboxes.extend(self._call(node, "List", request, context).sandboxes)
        owner = _owner(context)
        wanted = dict(request.labels)
        with self._lock:
            lost = [
                r.info
                for r in self.routes.values()
                if r.info.state == "lost" and r.owner == owner and wanted.items() <= dict(r.info.spec.labels).items()
            ]
        merged.sandboxes.extend(lost)
        return merged

    @_gateway_errors
    def Destroy(self, request: pb.SandboxRef, context: grpc.ServicerContext) -> pb.Empty:
        with self._lock:
            route = self.routes.get(request.sandbox_id)
            node = self.nodes.get(route.node_id) if route else None
        if route is not None and node is not None and not node.alive and route.owner == _owner(context):
            self._forget(request.sandbox_id)  # nothing left to destroy: its node took it down
            return pb.Empty()
        response = self._unary(request.sandbox_id, "Destroy", request, context)
        self._forget(request.sandbox_id)
        return response

    # -- snapshots ----------------------------------------------------------------------------------------------
    @_gateway_errors
    def Snapshot(self, request: pb.SnapshotRequest, context: grpc.ServicerContext) -> pb.SnapshotRef:
        ref = self._unary(request.sandbox_id, "Snapshot", request, context)
        with self._lock:
            self.snapshots[ref.snapshot_id] = self.routes[request.sandbox_id].node_id
        return ref

    @_gateway_errors
    def Restore(self, request: pb.RestoreRequest, context: grpc.ServicerContext) -> pb.SandboxInfo:
        with self._lock:
            node = self.nodes.get(self.snapshots.get(request.snapshot_id, ""))
        if node is None:
            raise SnapshotNotFound(f"snapshot {request.snapshot_id} is not known to this gateway")
        if not node.alive:
            raise SandboxStateError(f"snapshot {request.snapshot_id} was on node {node.node_id}, which was lost")
        info = self._call(node, "Restore", request, context)
        self._record(node.node_id, info, _owner(context), charge=True)
        return info

    @_gateway_errors
    def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> pb.ListSnapshotsResponse:
        """One sandbox's snapshots from its node; all of the caller's from every live node otherwise."""
        if request.sandbox_id:
            nodes = [self._route(request.sandbox_id, context)[0]]
        else:
            nodes = self._live_nodes()
        merged = pb.ListSnapshotsResponse()
        for node in nodes:
            found = self._call(node, "ListSnapshots", request, context).snapshots
            with self._lock:
                for ref in found:
                    self.snapshots.setdefault(ref.snapshot_id, node.node_id)
            merged.snapshots.extend(found)
        return merged

    @_gateway_errors
    def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest, context: grpc.ServicerContext) -> pb.Empty:
        with self._lock:
            node = self.nodes.get(self.snapshots.get(request.snapshot_id, ""))
        if node is None:
            raise SnapshotNotFound(f"snapshot {request.snapshot_id} is not known to this gateway")
        if not node.alive:
            raise SandboxStateError(f"snapshot {request.snapshot_id} was on node {node.node_id}, which was lost")
        reply = self._call(node, "DeleteSnapshot", request, context)
        with self._lock:
            self.snapshots.pop(request.snapshot_id, None)
        return reply

    @_gateway_errors
    def Fork(self, request: pb.ForkRequest, context: grpc.ServicerContext) -> pb.ForkResponse:
        response = self._unary(request.sandbox_id, "Fork", request, context)
        node_id = self.node_of(request.sandbox_id)
        for info in response.sandboxes:
            self._record(node_id, info, _owner(context), charge=True)
        return response


class AnyNodeForwarder(grpc.GenericRpcHandler):
    """Forwards every unary call of a node-agnostic service (TrajectoryService) as raw bytes to a live node.

    Why any node: in a cluster the nodes share one trajectory log (PostgreSQL), so each answers the same.
    The first live node (in join order) is used, so with node-local file logs calls stay on one node until
    it is lost; a node found lost mid-call is skipped and the next one is asked. Rebuild is the exception:
    it opens a window in the coordinator of the node running the target sandbox, so it goes there.
    """

    def __init__(self, gateway: Gateway, service: str = "dsec.v1.TrajectoryService") -> None:
        self._gateway = gateway
        self._prefix = f"/{service}/"

    def service(self, handler_call_details):  # type: ignore[no-untyped-def]
        method = handler_call_details.method
        if not method.startswith(self._prefix):
            return None

        @_gateway_errors
        def forward(_self, request: bytes, context: grpc.ServicerContext) -> bytes:
            if method.endswith("/Rebuild"):
                # The rebuild window lives in the coordinator of the server that runs the sandbox.
                sandbox_id = tpb.RebuildRequest.FromString(request).sandbox_id
                node, _ = self._gateway._route(sandbox_id, context)
                return self._gateway._call_raw(node, method, request, context)
            for node in self._gateway._live_nodes():
                try:
                    return self._gateway._call_raw(node, method, request, context)
                except SandboxStateError:
                    continue  # that node was lost while we asked it: ask the next one
            raise ServerUnavailable(f"no live node to answer {method}; add nodes to the cluster")

        return grpc.unary_unary_rpc_method_handler(functools.partial(forward, None))


class PortForwarder(grpc.GenericRpcHandler):
    """Forwards PortService.ForwardPort streams, as raw bytes, to the node that runs the sandbox.

    Why raw bytes: only the first message (it names the sandbox) is parsed to pick the node; the rest of
    the byte stream is relayed message by message in both directions, so a long-lived connection (a
    WebSocket, a kernel) costs the gateway no decoding. Cancelling either side cancels the other.
    """

    METHOD = "/dsec.v1.PortService/ForwardPort"

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def service(self, handler_call_details):  # type: ignore[no-untyped-def]
        if handler_call_details.method != self.METHOD:
            return None

        @_gateway_errors
        def forward(_self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            first = next(request_iterator, None)
            if first is None:
                raise InvalidSpec("ForwardPort stream must start with an `open` message")
            opening = ppb.PortChunk.FromString(first)
            if opening.WhichOneof("kind") != "open":
                raise InvalidSpec("ForwardPort stream must start with an `open` message naming sandbox_id and port")
            node, _ = self._gateway._route(opening.open.sandbox_id, context)

            def upstream() -> Iterator[bytes]:
                yield first
                yield from request_iterator

            call = node.channel.stream_stream(self.METHOD)(upstream(), timeout=_timeout(context), metadata=_outgoing(context))
            context.add_callback(call.cancel)
            try:
                yield from call
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    raise self._gateway._relay(node, exc) from None
            finally:
                call.cancel()

        return grpc.stream_stream_rpc_method_handler(functools.partial(forward, None))


class SandboxRoutedForwarder(grpc.GenericRpcHandler):
    """Forwards a service's calls, as raw bytes, to the node that runs the sandbox each request names.

    Why raw bytes: the request is decoded only to read its sandbox id; request and response (or a stream, message
    by message, cancelled together with the caller) are relayed unchanged, so a new field in the service's proto
    needs no gateway change. One table per service says how to find the sandbox id in a request (in the first
    message of a client stream); the request type and which side streams come from the service's descriptor.
    `forget_not_found`: a NOT_FOUND from a unary call (the sandbox ended on its node: TTL, destroyed elsewhere)
    stops the gateway routing to it.
    """

    def __init__(
        self,
        gateway: Gateway,
        service: ServiceDescriptor,
        methods: dict[str, Callable[[Any], str]],
        forget_not_found: bool = False,
    ) -> None:
        self._gateway = gateway
        self._prefix = f"/{service.full_name}/"
        self._service = service
        self._methods = methods
        self._forget_not_found = forget_not_found

    def service(self, handler_call_details):  # type: ignore[no-untyped-def]
        method = handler_call_details.method
        name = method[len(self._prefix) :] if method.startswith(self._prefix) else ""
        if name not in self._methods:
            return None
        descriptor = self._service.methods_by_name[name]
        request_type = GetMessageClass(descriptor.input_type)
        sandbox_of = self._methods[name]
        gateway = self._gateway
        forget_not_found = self._forget_not_found

        def route(request: bytes, context: grpc.ServicerContext) -> tuple[Node, Route | None, str]:
            try:
                parsed = request_type.FromString(request)
            except Exception as exc:  # noqa: BLE001 - a malformed message is the caller's error
                raise InvalidSpec(f"malformed {method} request: {exc}") from None
            sandbox_id = sandbox_of(parsed)
            return (*gateway._route(sandbox_id, context), sandbox_id)

        def relayed(node: Node, call: Any) -> Iterator[bytes]:
            try:
                yield from call
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    raise gateway._relay(node, exc) from None
            finally:
                call.cancel()

        if descriptor.client_streaming:

            @_gateway_errors
            def client_stream(_self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
                first = next(request_iterator, b"")
                node, _, _ = route(first, context)

                def upstream() -> Iterator[bytes]:
                    yield first
                    yield from request_iterator

                try:
                    return node.channel.stream_unary(method)(upstream(), timeout=_timeout(context),
                                                             metadata=_outgoing(context))
                except grpc.RpcError as exc:
                    raise gateway._relay(node, exc) from None

            return grpc.stream_unary_rpc_method_handler(functools.partial(client_stream, None))

        if descriptor.server_streaming:

            @_gateway_errors
            def stream(_self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
                node, _, _ = route(request, context)
                call = node.channel.unary_stream(method)(request, timeout=_timeout(context), metadata=_outgoing(context))
                context.add_callback(call.cancel)
                yield from relayed(node, call)

            return grpc.unary_stream_rpc_method_handler(functools.partial(stream, None))

        @_gateway_errors
        def unary(_self, request: bytes, context: grpc.ServicerContext) -> bytes:
            node, known, sandbox_id = route(request, context)
            try:
                return gateway._call_raw(node, method, request, context)
            except _Relay as relay:
                if (forget_not_found and relay.code == grpc.StatusCode.NOT_FOUND and known is not None
                        and known.owner == _owner(context)):
                    gateway._forget(sandbox_id)
                raise

        return grpc.unary_unary_rpc_method_handler(functools.partial(unary, None))


def _header_sandbox(method: str) -> Callable[[Any], str]:
    """The sandbox a client stream (WriteFile, Upload) writes to: named by its first message, the header."""

    def sandbox_of(first: Any) -> str:
        if not first.HasField("header"):
            raise InvalidSpec(f"{method} stream must start with a header")
        return first.header.sandbox_id

    return sandbox_of


# SandboxService calls that only go to the sandbox's node; the rest (lifecycle, snapshots, fork) are Gateway methods
SANDBOX_METHODS: dict[str, Callable[[Any], str]] = {
    **{name: (lambda r: r.sandbox_id) for name in (
        "SetTimeout", "Pause", "Resume", "Metrics", "Logs", "Exec", "ExecCollect", "StartSession", "CloseSession",
        "ReadFile", "ListDir", "Download", "Call")},
    "RunInSession": lambda r: r.session.sandbox_id,
    "WriteFile": _header_sandbox("WriteFile"),
    "Upload": _header_sandbox("Upload"),
}
GATEWAY_METHODS = ("Create", "Get", "List", "Destroy", "Snapshot", "Restore", "ListSnapshots", "DeleteSnapshot", "Fork")
# ProcessService: every request names its sandbox (a selector's or its own `sandbox_id`)
PROCESS_METHODS: dict[str, Callable[[Any], str]] = {
    "Start": lambda r: r.sandbox_id,
    "Connect": lambda r: r.sandbox_id,
    "List": lambda r: r.sandbox_id,
    "SendInput": lambda r: r.process.sandbox_id,
    "CloseStdin": lambda r: r.sandbox_id,
    "SendSignal": lambda r: r.process.sandbox_id,
    "ResizePty": lambda r: r.process.sandbox_id,
}
FILESYSTEM_METHODS: dict[str, Callable[[Any], str]] = {
    "Stat": lambda r: r.sandbox_id,
    "Chown": lambda r: r.sandbox_id,
    "MakeDir": lambda r: r.target.sandbox_id,
    "Move": lambda r: r.source.sandbox_id,
    "Remove": lambda r: r.target.sandbox_id,
    "ListTree": lambda r: r.target.sandbox_id,
    "Resolve": lambda r: r.target.sandbox_id,
    "Watch": lambda r: r.target.sandbox_id,
}


def _gateway_handler(gateway: Gateway) -> grpc.GenericRpcHandler:
    """The SandboxService calls the gateway answers itself (placement, merged lists, lost nodes, snapshot homes)."""
    service = pb.DESCRIPTOR.services_by_name["SandboxService"]
    handlers = {}
    for name in GATEWAY_METHODS:
        method = service.methods_by_name[name]
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(gateway, name),
            request_deserializer=GetMessageClass(method.input_type).FromString,
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


@dataclass
class RunningGateway:
    gateway: Gateway
    server: grpc.Server
    address: str
    _stop: threading.Event
    _monitor: threading.Thread

    def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        self.server.stop(grace).wait()
        self._monitor.join(timeout=10)
        for node in self.gateway.nodes.values():
            node.channel.close()


def serve_gateway(
    gateway: Gateway, listen: str = "127.0.0.1:0", probe_interval_s: float = 1.0, workers: int = 64
) -> RunningGateway:
    """Serve `gateway` on `listen` and probe its nodes every `probe_interval_s` in a background thread."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dsec-gw"),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=workers * 16,
    )
    server.add_generic_rpc_handlers((
        _gateway_handler(gateway),
        SandboxRoutedForwarder(gateway, pb.DESCRIPTOR.services_by_name["SandboxService"], SANDBOX_METHODS,
                               forget_not_found=True),
        AnyNodeForwarder(gateway),
        PortForwarder(gateway),
        SandboxRoutedForwarder(gateway, procpb.DESCRIPTOR.services_by_name["ProcessService"], PROCESS_METHODS),
        SandboxRoutedForwarder(gateway, fpb.DESCRIPTOR.services_by_name["FilesystemService"], FILESYSTEM_METHODS),
    ))
    port = server.add_insecure_port(listen)
    if port == 0:
        raise ServerUnavailable(f"gateway could not bind {listen}; pick another address")
    server.start()
    stop = threading.Event()

    def monitor() -> None:
        while not stop.wait(probe_interval_s):
            try:
                gateway.check_nodes()
            except Exception:  # noqa: BLE001 - a failed probe round must not end monitoring
                log.exception("gateway: node health check failed")

    thread = threading.Thread(target=monitor, daemon=True, name="dsec-gw-monitor")
    thread.start()
    address = f"{listen.rsplit(':', 1)[0]}:{port}"
    log.info("dsec gateway listening on %s", address)
    return RunningGateway(gateway, server, address, stop, thread)
