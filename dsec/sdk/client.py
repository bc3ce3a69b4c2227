"""`Client`: one gRPC channel to a dsec server (remote via address/DSEC_ADDRESS, or embedded)."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from pydantic import ValidationError

from dsec import wire
from dsec.errors import CapacityExceeded, InvalidSpec
from dsec.models import (
    CollectedSnapshot, PushedSnapshot, ReadyProbe, SandboxInfo, SandboxSpec, SnapshotInfo, VolumeMount,
)
from dsec.sdk.embedded import EmbeddedServer
from dsec.sdk.snapshot_registry import pull_snapshot, push_snapshot
from dsec.sdk.errors import to_dsec_error
from dsec.v1 import sandbox_pb2 as pb
from dsec.v1 import sandbox_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from dsec.sdk.images import Images
    from dsec.sdk.pools import Pools
    from dsec.sdk.sandbox import Sandbox
    from dsec.sdk.templates import Templates
    from dsec.sdk.volumes import Volumes

T = TypeVar("T")
MAX_MESSAGE = 64 << 20
CAPACITY_RETRY_S = 600.0
DEFAULT_RETRY_AFTER_S = 0.5  # when gRPC itself sheds load (concurrent-RPC limit) it sends no retry-after


def _retry_after(error: CapacityExceeded) -> float | None:
    """Seconds to wait before retrying a capacity rejection, or None if it is not retryable (oversized message)."""
    if error.details.get("retry_after_s") is not None:
        return float(error.details["retry_after_s"])
    if "concurrent rpc limit" in error.message.lower():
        return DEFAULT_RETRY_AFTER_S
    return None


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


class Client:
    """Connection to a dsec server. With no address and no $DSEC_ADDRESS, starts an embedded server."""

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        http_listen: str | None = None,
    ) -> None:
        """`token` (or $DSEC_TOKEN) authenticates; `tls_ca` (or $DSEC_TLS_CA) switches to TLS, and
        `tls_cert`/`tls_key` add a client certificate for servers that require mutual TLS. `http_listen`
        (or $DSEC_HTTP_LISTEN) makes the embedded server also serve the E2B/SandboxFusion HTTP front door."""
        address = address or os.environ.get("DSEC_ADDRESS") or None
        self._embedded: EmbeddedServer | None = None
        if address is None:
            self._embedded = EmbeddedServer.start(http_listen=http_listen)
            address = self._embedded.address
        self.address = address
        self._token = token or os.environ.get("DSEC_TOKEN") or None
        options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
        tls_ca = tls_ca or os.environ.get("DSEC_TLS_CA") or None
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca),
                private_key=_read(tls_key) if tls_key else None,
                certificate_chain=_read(tls_cert) if tls_cert else None,
            )
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.sandboxes = pb_grpc.SandboxServiceStub(self.channel)
        self._images: Images | None = None
        self._pools: Pools | None = None
        self._volumes: Volumes | None = None
        self._templates: Templates | None = None

    @property
    def images(self) -> Images:
        """The server's image store: `client.images.build(...)`, `.pull(...)`, `.ls()`, `.prune()`, ..."""
        if self._images is None:
            from dsec.sdk.images import Images  # imports this module: resolved on first use

            self._images = Images(self)
        return self._images

    @property
    def pools(self) -> Pools:
        """The server's warm pools: `client.pools.list()`, `client.pools.resize("busybox", size=8)`."""
        if self._pools is None:
            from dsec.sdk.pools import Pools

            self._pools = Pools(self)
        return self._pools

    @property
    def volumes(self) -> Volumes:
        """Named volumes: `client.volumes.create("data", size_mb=64)`, `.list()`, `.delete("data")`; mount one with
        `client.create(..., volumes=[VolumeMount(name="data", mount_path="/data")])`."""
        if self._volumes is None:
            from dsec.sdk.volumes import Volumes

            self._volumes = Volumes(self)
        return self._volumes

    @property
    def templates(self) -> Templates:
        """Ready templates: `client.templates.create("web", image="python", start=[...], ready={"tcp_port": 8000})`,
        then `client.create(template="web")` returns a sandbox with the service already answering."""
        if self._templates is None:
            from dsec.sdk.templates import Templates

            self._templates = Templates(self)
        return self._templates

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self._token}")] if self._token else []

    def rpc(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        """Unary call with typed errors; honours the server's retry-after when it is at capacity."""
        deadline = time.monotonic() + CAPACITY_RETRY_S
        while True:
            try:
                return method(request, timeout=timeout, metadata=self.metadata)
            except grpc.RpcError as exc:
                error = to_dsec_error(exc)
                retry_after = _retry_after(error) if isinstance(error, CapacityExceeded) else None
                if retry_after is not None and time.monotonic() < deadline:
                    jitter = random.uniform(0.8, 1.2)  # spread a thundering herd of retries
                    time.sleep(min(retry_after * jitter, max(deadline - time.monotonic(), 0)))
                    continue
                raise error from None

    def stream(self, method: Callable[..., Iterable[T]], request: Any, timeout: float | None = None) -> Iterable[T]:
        try:
            yield from method(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise to_dsec_error(exc) from None

    def client_stream(self, method: Callable[..., T], requests: Iterable[Any], timeout: float | None = None) -> T:
        try:
            return method(iter(requests), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise to_dsec_error(exc) from None

    # -- sandboxes -------------------------------------------------------------------------------------
    def create(
        self,
        image: str = "busybox",
        substrate: str = "container",
        *,
        cpu: float | None = None,
        memory_mb: int | None = None,
        pids: int | None = None,
        disk_mb: int | None = None,
        timeout_s: float | None = None,
        env: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        network: bool = False,
        network_allow: list[str] | None = None,
        driver: str = "",
        workdir: str = "",
        on_timeout: str = "destroy",
        auto_resume: bool = False,
        idle_timeout_s: float = 0.0,
        trust_results: bool = False,
        volumes: list[VolumeMount | dict] | None = None,
        template: str = "",
        ready: ReadyProbe | dict | None = None,
    ) -> Sandbox:
        """Create a sandbox; validated locally first so a typo fails before any RPC. `on_timeout="pause"` pauses it
        when `timeout_s` expires instead of destroying it (resume gives it a whole timeout again); `auto_resume`
        makes any call on a paused sandbox resume it first;
        `idle_timeout_s` ends it (SandboxExpired reason "idle") after that long without a call. `template` starts
        it from a ready template (client.templates); `ready` (a ReadyProbe) runs the image's start command and
        returns only once the probe passes (else SandboxNotReady, the sandbox destroyed)."""
        from dsec.sdk.sandbox import Sandbox

        resources = {
            k: v for k, v in {"cpu": cpu, "memory_mb": memory_mb, "pids": pids, "disk_mb": disk_mb}.items() if v is not None
        }
        try:
            spec = SandboxSpec(
                image=image,
                substrate=substrate,  # type: ignore[arg-type]
                resources=resources,  # type: ignore[arg-type]
                **({} if timeout_s is None else {"timeout_s": timeout_s}),  # unset: the server's default
                env=env or {},
                labels=labels or {},
                network=network,
                network_allow=network_allow or [],
                driver=driver,
                workdir=workdir,
                on_timeout=on_timeout,  # type: ignore[arg-type]
                auto_resume=auto_resume,
                idle_timeout_s=idle_timeout_s,
                volumes=volumes or [],  # type: ignore[arg-type]
                template=template,
                ready=ready,  # type: ignore[arg-type]
            )
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise InvalidSpec(f"invalid sandbox spec: {problems}") from None
        request = pb.CreateRequest(spec=wire.spec_to_pb(spec, leave_defaults_to_server=True))
        info = wire.from_pb_as(SandboxInfo, self.rpc(self.sandboxes.Create, request))
        return Sandbox(self, info, trust_results=trust_results)

    def connect(self, sandbox_id: str, *, trust_results: bool = False) -> Sandbox:
        """Re-attach to a live sandbox by id (e.g. after the rollout process restarted)."""
        from dsec.sdk.sandbox import Sandbox

        info = self.rpc(self.sandboxes.Get, pb.SandboxRef(sandbox_id=sandbox_id))
        return Sandbox(self, wire.from_pb_as(SandboxInfo, info), trust_results=trust_results)

    def list(self, labels: dict[str, str] | None = None) -> list[SandboxInfo]:
        reply = self.rpc(self.sandboxes.List, pb.ListRequest(labels=labels or {}))
        return [wire.from_pb_as(SandboxInfo, info) for info in reply.sandboxes]

    def destroy(self, sandbox_id: str) -> None:
        self.rpc(self.sandboxes.Destroy, pb.SandboxRef(sandbox_id=sandbox_id))

    def restore(self, snapshot_id: str, *, labels: dict[str, str] | None = None, timeout_s: float = 0.0) -> Sandbox:
        from dsec.sdk.sandbox import Sandbox

        request = pb.RestoreRequest(snapshot_id=snapshot_id, labels=labels or {}, timeout_s=timeout_s)
        return Sandbox(self, wire.from_pb_as(SandboxInfo, self.rpc(self.sandboxes.Restore, request)))

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
        from dsec.sdk.templates import collect_snapshots

        return collect_snapshots(self)

    def close(self) -> None:
        """Close the channel; an embedded server destroys its sandboxes and exits."""
        self.channel.close()
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The process-wide client used when none is passed (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default
