"""The SandboxService servicer: thin gRPC glue over SandboxManager, the exec engine and the step log."""

from __future__ import annotations

import base64
import hashlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from dsec import wire
from dsec.config import ServerConfig
from dsec.errors import InvalidSpec, Unsupported
from dsec.models import PAUSE_KINDS, PoolInfo, SandboxInfo, SandboxLogEntry, SandboxMetrics, SnapshotInfo
from dsec.server.auth import DEFAULT_TENANT, Authenticator
from dsec.server.errors import rpc_errors
from dsec.server.execution import run_process
from dsec.server.manager import ManagedSandbox, SandboxManager
from dsec.server.metrics import EXEC_SECONDS, EXECS, STEPS
from dsec.server.paths import sandbox_path
from dsec.server.sessions import check_on_timeout
from dsec.server.transfer import download_tar, upload_tar
from dsec.substrates import registry
from dsec.trajectory.log import StepRef
from dsec.v1 import sandbox_pb2 as pb
from dsec.v1 import sandbox_pb2_grpc as pb_grpc

_CHUNK = 1 << 20
MAX_STDIN = 64 << 20
COLLECT_MAX_OUTPUT = 16 << 20  # per stream, in ExecCollect: both streams at the cap fit one 64 MiB message


def request_hash(kind: str, image_digest: str, message) -> str:
    """sha256 over what determines a call's effect: its kind, the image, and the request minus its step key
    and the sandbox/session it targets (a rebuilt or restored sandbox has a new id but must match the log)."""
    clone = type(message)()
    clone.CopyFrom(message)
    for name in ("step", "sandbox_id", "session"):
        if name in clone.DESCRIPTOR.fields_by_name:
            clone.ClearField(name)
    digest = hashlib.sha256()
    digest.update(kind.encode() + b"\0" + image_digest.encode() + b"\0")
    digest.update(clone.SerializeToString(deterministic=True))
    return digest.hexdigest()


def tenant_trajectory_id(tenant: str, trajectory_id: str) -> str:
    """Trajectories live in one log; other tenants' ids are prefixed so no tenant can read or hit another's."""
    return trajectory_id if tenant == DEFAULT_TENANT else f"tenant:{tenant}/{trajectory_id}"


def _events_from_record(record: bytes, replayed: bool) -> Iterator[pb.ExecEvent]:
    parsed = pb.ExecRecord.FromString(record)
    for start in range(0, len(parsed.stdout), _CHUNK):
        yield pb.ExecEvent(stdout=parsed.stdout[start : start + _CHUNK])
    for start in range(0, len(parsed.stderr), _CHUNK):
        yield pb.ExecEvent(stderr=parsed.stderr[start : start + _CHUNK])
    status = pb.ExecStatus()
    status.CopyFrom(parsed.status)
    status.replayed = replayed
    yield pb.ExecEvent(status=status)


def _outcome(status: pb.ExecStatus) -> str:
    if status.replayed:
        return "replayed"
    if status.oom_killed:
        return "oom"
    if status.timed_out:
        return "timeout"
    return "ok" if status.exit_code == 0 else "nonzero"


_metric_children: dict[tuple, Any] = {}


def _child(metric, *labels: str):
    """`metric.labels(*labels)`, kept: prometheus_client validates and locks on every `labels` call."""
    key = (metric, *labels)
    child = _metric_children.get(key)
    if child is None:
        child = _metric_children[key] = metric.labels(*labels)
    return child


def _finished(sandbox: ManagedSandbox, kind: str, command: str, status: pb.ExecStatus, started: float) -> None:
    """What every exec and session command records when its status is known: its latency and outcome for
    /metrics (exec only) and a line in the sandbox's own log (the Logs RPC)."""
    outcome = _outcome(status)
    if kind == "exec":
        substrate = sandbox.spec.substrate
        _child(EXEC_SECONDS, substrate).observe(time.monotonic() - started)
        _child(EXECS, substrate, outcome).inc()
    level = "info" if status.exit_code == 0 and not status.timed_out and not status.oom_killed else "warn"
    sandbox.events.add(f"{kind} finished", level, command=command, exit_code=status.exit_code, outcome=outcome,
                       duration_s=round(status.duration_s, 3))


def _recorded(sandbox: ManagedSandbox, kind: str, command: str, events: Iterator[pb.ExecEvent]) -> Iterator[pb.ExecEvent]:
    """Pass events through; the status is recorded (`_finished`) before it is sent."""
    started = time.monotonic()
    for event in events:
        if event.HasField("status"):
            _finished(sandbox, kind, command, event.status, started)
        yield event


def _metrics_pb(sandbox: ManagedSandbox) -> pb.SandboxMetrics:
    """One sample; CPU % is over the time since the previous sample of this sandbox (or since its create)."""
    usage = sandbox.handle.usage()
    now = time.time()
    previous_time, previous_cpu = sandbox.last_usage or (sandbox.created_at, 0.0)
    sandbox.last_usage = (now, usage.cpu_seconds)
    cores = max(usage.cpu_limit, 0.01)
    elapsed = max(now - previous_time, 1e-3)
    pct = max(0.0, min(100.0, 100.0 * (usage.cpu_seconds - previous_cpu) / (elapsed * cores)))
    return wire.to_pb(SandboxMetrics(
        sampled_at=now, cpu_count=max(1, math.ceil(cores - 1e-9)), cpu_used_pct=pct,
        mem_used_bytes=usage.mem_used_bytes, mem_total_bytes=usage.mem_total_bytes, mem_cache_bytes=usage.mem_cache_bytes,
        disk_used_bytes=usage.disk_used_bytes, disk_total_bytes=usage.disk_total_bytes,
    ))  # fmt: skip


@dataclass(frozen=True)
class _Write:
    """How one byte-writing RPC puts a client's bytes into a sandbox (WriteFile: one file; Upload: a tar)."""

    kind: str  # the step log's kind
    response: type  # the RPC's response message
    write: Callable[[Iterable[bytes]], Any]  # writes the chunks, returns the response
    step_payload: Callable[[bytes], bytes]  # what a step's request hash covers, given the whole content


class SandboxService(pb_grpc.SandboxServiceServicer):
    def __init__(self, config: ServerConfig, manager: SandboxManager, steps=None, auth: Authenticator | None = None) -> None:
        self.config = config
        self.manager = manager
        self.steps = steps  # dsec.trajectory.coordinator.StepCoordinator, when the trajectory log is enabled
        self.auth = auth or Authenticator({})

    def _tenant(self, context: grpc.ServicerContext) -> str:
        return self.auth.tenant(context)

    # -- lifecycle ------------------------------------------------------------------------------------
    @rpc_errors
    def Create(self, request: pb.CreateRequest, context: grpc.ServicerContext) -> pb.SandboxInfo:
        spec = wire.spec_from_pb(request.spec, self.config.default_resources, self.config.default_timeout_s)
        return info_to_pb(self.manager.create(spec, self._tenant(context)))

    @rpc_errors
    def Get(self, request: pb.SandboxRef, context: grpc.ServicerContext) -> pb.SandboxInfo:
        return info_to_pb(self.manager.get(request.sandbox_id, self._tenant(context)))

    @rpc_errors
    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        return pb.ListResponse(sandboxes=[info_to_pb(s) for s in self.manager.list(dict(request.labels), self._tenant(context))])

    @rpc_errors
    def Destroy(self, request: pb.SandboxRef, context: grpc.ServicerContext) -> pb.Empty:
        # returns once the sandbox is killed; unmounts and file removal finish in the background (manager.teardown)
        self.manager.destroy(request.sandbox_id, tenant=self._tenant(context), wait=False)
        return pb.Empty()

    @rpc_errors
    def SetTimeout(self, request: pb.SetTimeoutRequest, context: grpc.ServicerContext) -> pb.SandboxInfo:
        return info_to_pb(self.manager.set_timeout(request.sandbox_id, request.timeout_s, self._tenant(context),
                                                   extend=request.extend))

    @rpc_errors
    def ListPools(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.ListPoolsResponse:
        self._tenant(context)
        return pb.ListPoolsResponse(pools=[pool_to_pb(p) for p in self.manager.pools.list()])

    @rpc_errors
    def ResizePool(self, request: pb.ResizePoolRequest, context: grpc.ServicerContext) -> pb.PoolInfo:
        return pool_to_pb(self.manager.pools.resize(wire.pool_config_from_pb(request), self._tenant(context)))

    # -- step log glue ----------------------------------------------------------------------------------
    def _logged(
        self, sandbox: ManagedSandbox, kind: str, request, execute: Callable[[], bytes]
    ) -> tuple[bytes, bool]:
        step = request.step if request.HasField("step") else None
        if step is None or not step.trajectory_id:
            return execute(), False
        if self.steps is None:
            raise Unsupported("this server runs without a trajectory log; drop the step key or enable the log")
        digest = step.request_hash or request_hash(kind, sandbox.image.digest, request)
        trajectory_id = tenant_trajectory_id(sandbox.tenant, step.trajectory_id)
        ref = StepRef(trajectory_id, step.step, digest, kind, sandbox.sandbox_id)
        result, replayed = self.steps.run_once(ref, execute)
        STEPS.labels(kind, "replayed" if replayed else "executed").inc()
        return result, replayed

    def _stream_logged(
        self, sandbox: ManagedSandbox, kind: str, request, produce: Callable[[], Iterator[pb.ExecEvent]]
    ) -> Iterator[pb.ExecEvent]:
        """Stream output live while the step runs in its own thread, so it completes and is logged even if
        the client disconnects; the status is sent only after the record is durable."""
        if not (request.HasField("step") and request.step.trajectory_id):
            yield from produce()
            return
        live: queue.Queue = queue.Queue()

        def execute() -> bytes:
            record = pb.ExecRecord()
            for event in produce():
                if event.HasField("status"):
                    record.status.CopyFrom(event.status)
                else:
                    if event.stdout:
                        record.stdout += event.stdout
                    if event.stderr:
                        record.stderr += event.stderr
                    live.put(event)
            return record.SerializeToString()

        outcome: dict = {}

        def run() -> None:
            try:
                outcome["result"] = self._logged(sandbox, kind, request, execute)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the RPC thread
                outcome["error"] = exc
            finally:
                live.put(None)

        threading.Thread(target=run, daemon=True, name=f"dsec-step-{kind}").start()
        streamed = False
        while (event := live.get()) is not None:
            streamed = True
            yield event
        if "error" in outcome:
            raise outcome["error"]
        record, replayed = outcome["result"]
        if streamed:
            status = pb.ExecRecord.FromString(record).status
            yield pb.ExecEvent(status=status)
        else:
            yield from _events_from_record(record, replayed)

    # -- exec -----------------------------------------------------------------------------------------------
    @rpc_errors
    def Exec(self, request: pb.ExecRequest, context: grpc.ServicerContext) -> Iterator[pb.ExecEvent]:
        sandbox, described, produce = self._exec(request, context)
        with sandbox.active():
            yield from _recorded(sandbox, "exec", described, self._stream_logged(sandbox, "exec", request, produce))

    @rpc_errors
    def ExecCollect(self, request: pb.ExecRequest, context: grpc.ServicerContext) -> pb.ExecRecord:
        """Exec's events gathered into one reply: a server stream costs a send and its completion per message
        and the SDK a stream to drain, a tenth of a 2 ms exec; the output caps keep the reply under the limit.
        The events are read here, on the RPC's thread, with no generator between it and the exec engine's."""
        if (request.max_output_bytes or self.config.max_output_bytes) > COLLECT_MAX_OUTPUT:
            raise Unsupported(f"an output cap above {COLLECT_MAX_OUTPUT} bytes does not fit one reply; use Exec")
        sandbox, described, produce = self._exec(request, context)
        record = pb.ExecRecord()
        stdout: list[bytes] = []
        stderr: list[bytes] = []
        with sandbox.active():
            started = time.monotonic()
            for event in self._stream_logged(sandbox, "exec", request, produce):
                which = event.WhichOneof("event")
                if which == "stdout":
                    stdout.append(event.stdout)
                elif which == "stderr":
                    stderr.append(event.stderr)
                elif which == "status":
                    _finished(sandbox, "exec", described, event.status, started)
                    record.status.CopyFrom(event.status)
        if stdout:
            record.stdout = b"".join(stdout)
        if stderr:
            record.stderr = b"".join(stderr)
        return record

    def _exec(
        self, request: pb.ExecRequest, context: grpc.ServicerContext
    ) -> tuple[ManagedSandbox, str, Callable[[], Iterator[pb.ExecEvent]]]:
        """The checked request's sandbox, how the sandbox log names the command, and what runs it (events)."""
        sandbox = self.manager.running(request.sandbox_id, self._tenant(context))
        if bool(request.argv) == bool(request.command):
            raise InvalidSpec("give exactly one of argv or command")
        if len(request.stdin) > MAX_STDIN:
            raise InvalidSpec(f"stdin larger than {MAX_STDIN} bytes; upload a file instead")
        if request.timeout_s < 0:
            raise InvalidSpec("timeout_s must be >= 0")
        argv = list(request.argv) or ["/bin/sh", "-c", request.command]
        env = sandbox.exec_env(request.env)
        cwd = sandbox_path(request.cwd, "/") if request.cwd else sandbox.default_cwd()
        max_output = request.max_output_bytes or self.config.max_output_bytes
        handle = sandbox.handle

        def produce() -> Iterator[pb.ExecEvent]:
            oom_before = handle.oom_kill_count()
            if request.stdin:
                process = handle.spawn(argv, env, cwd, stdin=True)
            else:  # a failed start is raised from the events instead, and the thread wakes once, for the exit
                process = handle.launch(argv, env, cwd)
            return run_process(
                handle,
                process,
                stdin=request.stdin or None,
                timeout_s=request.timeout_s,
                max_output_bytes=max_output,
                oom_kills_before=oom_before,
            )

        return sandbox, request.command or " ".join(request.argv), produce

    # -- sessions -------------------------------------------------------------------------------------------
    @rpc_errors
    def StartSession(self, request: pb.StartSessionRequest, context: grpc.ServicerContext) -> pb.SessionRef:
        cwd = sandbox_path(request.cwd) if request.cwd else ""
        on_timeout = check_on_timeout(request.on_timeout)
        session = self.manager.start_session(
            request.sandbox_id, dict(request.env), cwd, request.shell, self._tenant(context), on_timeout
        )
        return pb.SessionRef(sandbox_id=request.sandbox_id, session_id=session.session_id)

    @rpc_errors
    def RunInSession(self, request: pb.RunInSessionRequest, context: grpc.ServicerContext) -> Iterator[pb.ExecEvent]:
        sandbox = self.manager.running(request.session.sandbox_id, self._tenant(context))
        session = self.manager.session(request.session.sandbox_id, request.session.session_id, self._tenant(context))
        max_output = request.max_output_bytes or self.config.max_output_bytes

        def produce() -> Iterator[pb.ExecEvent]:
            return session.run(request.command, request.timeout_s, max_output)

        with sandbox.active():
            yield from _recorded(sandbox, "session command", request.command,
                                 self._stream_logged(sandbox, "session", request, produce))

    @rpc_errors
    def CloseSession(self, request: pb.SessionRef, context: grpc.ServicerContext) -> pb.Empty:
        self.manager.close_session(request.sandbox_id, request.session_id, self._tenant(context))
        return pb.Empty()

    # -- files ------------------------------------------------------------------------------------------------
    @rpc_errors
    def ReadFile(self, request: pb.FileRequest, context: grpc.ServicerContext) -> Iterator[pb.FileChunk]:
        sandbox = self.manager.running(request.sandbox_id, self._tenant(context))
        for data in sandbox.handle.read_file(sandbox_path(request.path, sandbox.default_cwd())):
            yield pb.FileChunk(data=data)

    @rpc_errors
    def WriteFile(self, request_iterator, context: grpc.ServicerContext) -> pb.WriteFileResponse:
        def plan(sandbox: ManagedSandbox, header: pb.WriteFileHeader) -> _Write:
            path = sandbox_path(header.path, sandbox.default_cwd())
            mode = header.mode or 0o644
            if not 0 <= mode <= 0o7777:
                raise InvalidSpec(f"invalid file mode {oct(mode)}")
            hashed = pb.WriteFileHeader()
            hashed.CopyFrom(header)
            hashed.ClearField("step")
            hashed.ClearField("sandbox_id")
            return _Write(
                "write_file",
                pb.WriteFileResponse,
                lambda chunks: pb.WriteFileResponse(
                    size_bytes=sandbox.handle.write_file(path, chunks, mode, header.make_parents)),
                lambda content: hashed.SerializeToString() + content,
            )

        return self._write_stream("WriteFile", request_iterator, context, plan)

    @rpc_errors
    def ListDir(self, request: pb.FileRequest, context: grpc.ServicerContext) -> pb.ListDirResponse:
        sandbox = self.manager.running(request.sandbox_id, self._tenant(context))
        entries = sandbox.handle.list_dir(sandbox_path(request.path, sandbox.default_cwd()))
        return pb.ListDirResponse(entries=[wire.to_pb(entry) for entry in entries])

    @rpc_errors
    def Upload(self, request_iterator, context: grpc.ServicerContext) -> pb.UploadResponse:
        def plan(sandbox: ManagedSandbox, header: pb.UploadHeader) -> _Write:
            dest = sandbox_path(header.path, sandbox.default_cwd())
            return _Write(
                "upload",
                pb.UploadResponse,
                lambda chunks: pb.UploadResponse(size_bytes=upload_tar(sandbox.handle, dest, chunks)),
                lambda content: dest.encode() + b"\0" + content,
            )

        return self._write_stream("Upload", request_iterator, context, plan)

    def _write_stream(
        self, rpc: str, request_iterator, context: grpc.ServicerContext, plan: Callable[[ManagedSandbox, Any], _Write]
    ) -> Any:
        """The one path by which bytes streamed by a client land in a sandbox (WriteFile, Upload): the header
        first and only once, a running sandbox of the caller's, then either a plain streamed write or, inside a
        trajectory, a logged step whose hash covers the content (so it is read in full first)."""
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise InvalidSpec(f"{rpc} stream must start with a header")
        header = first.header
        sandbox = self.manager.running(header.sandbox_id, self._tenant(context))
        write = plan(sandbox, header)

        def chunks() -> Iterator[bytes]:
            for message in request_iterator:
                if message.HasField("header"):
                    raise InvalidSpec(f"{rpc} stream carries a second header")
                yield message.data

        if not (header.HasField("step") and header.step.trajectory_id):
            return write.write(chunks())
        content = b"".join(chunks())
        keyed = pb.CallRequest(sandbox_id=header.sandbox_id, payload=write.step_payload(content), step=header.step)
        record, replayed = self._logged(sandbox, write.kind, keyed, lambda: write.write([content]).SerializeToString())
        response = write.response.FromString(record)
        response.replayed = replayed
        return response

    @rpc_errors
    def Download(self, request: pb.FileRequest, context: grpc.ServicerContext) -> Iterator[pb.FileChunk]:
        sandbox = self.manager.running(request.sandbox_id, self._tenant(context))
        for data in download_tar(sandbox.handle, sandbox_path(request.path, sandbox.default_cwd())):
            yield pb.FileChunk(data=data)

    # -- function calls ---------------------------------------------------------------------------------------
    @rpc_errors
    def Call(self, request: pb.CallRequest, context: grpc.ServicerContext) -> pb.CallResponse:
        sandbox = self.manager.running(request.sandbox_id, self._tenant(context))
        if registry.CALL not in registry.get(sandbox.spec.substrate).capabilities:
            able = [s.name for s in registry.all_substrates() if registry.CALL in s.capabilities]
            raise InvalidSpec(
                f"sandbox {request.sandbox_id} is a {sandbox.spec.substrate} sandbox; Call needs substrate="
                f"{' or '.join(repr(name) for name in able)}"
            )
        if request.timeout_s < 0 or request.memory_mb < 0:
            raise InvalidSpec("timeout_s and memory_mb must be >= 0")
        handle = sandbox.handle

        def execute() -> bytes:
            reply = handle.call(request.payload, request.timeout_s, request.memory_mb)
            return pb.CallResponse(
                result=base64.b64decode(reply.get("result", "")),
                is_error=bool(reply.get("is_error")),
                traceback=reply.get("traceback", ""),
                error_type=reply.get("error_type", ""),
                duration_s=float(reply.get("duration_s", 0.0)),
                stdout=base64.b64decode(reply.get("stdout", "")),
                stderr=base64.b64decode(reply.get("stderr", "")),
            ).SerializeToString()

        with sandbox.active():
            record, replayed = self._logged(sandbox, "call", request, execute)
        response = pb.CallResponse.FromString(record)
        response.replayed = replayed
        return response

    # -- pause / snapshot / fork ------------------------------------------------------------------------------
    @rpc_errors
    def Pause(self, request: pb.PauseRequest, context: grpc.ServicerContext) -> pb.SandboxInfo:
        kind = request.kind or "freeze"
        if kind not in PAUSE_KINDS:
            raise InvalidSpec(f"pause kind must be one of {', '.join(PAUSE_KINDS)}, got {request.kind!r}")
        return info_to_pb(self.manager.pause(request.sandbox_id, self._tenant(context), kind))  # type: ignore[arg-type]

    @rpc_errors
    def Resume(self, request: pb.SandboxRef, context: grpc.ServicerContext) -> pb.SandboxInfo:
        return info_to_pb(self.manager.resume(request.sandbox_id, self._tenant(context)))

    @rpc_errors
    def Snapshot(self, request: pb.SnapshotRequest, context: grpc.ServicerContext) -> pb.SnapshotRef:
        return _snapshot_ref(self.manager.snapshot(request.sandbox_id, request.name, self._tenant(context),
                                                   ttl_s=request.ttl_s))

    @rpc_errors
    def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> pb.ListSnapshotsResponse:
        found = self.manager.list_snapshots(self._tenant(context), request.sandbox_id)
        return pb.ListSnapshotsResponse(snapshots=[_snapshot_ref(meta) for meta in found])

    @rpc_errors
    def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest, context: grpc.ServicerContext) -> pb.Empty:
        self.manager.delete_snapshot(request.snapshot_id, self._tenant(context))
        return pb.Empty()

    @rpc_errors
    def Restore(self, request: pb.RestoreRequest, context: grpc.ServicerContext) -> pb.SandboxInfo:
        return info_to_pb(self.manager.restore(request.snapshot_id, dict(request.labels), request.timeout_s, self._tenant(context)))

    @rpc_errors
    def Metrics(self, request: pb.SandboxRef, context: grpc.ServicerContext) -> pb.SandboxMetrics:
        sandbox = self.manager.get(request.sandbox_id, self._tenant(context))
        if sandbox.state not in ("running", "paused"):
            sandbox.require_running()  # names the state
        with sandbox.lock:
            return _metrics_pb(sandbox)

    @rpc_errors
    def Logs(self, request: pb.LogsRequest, context: grpc.ServicerContext) -> pb.LogsResponse:
        if request.limit < 0:
            raise InvalidSpec("limit must be >= 0")
        sandbox = self.manager.get(request.sandbox_id, self._tenant(context))
        entries = [
            wire.to_pb(SandboxLogEntry(logged_at=e.timestamp, level=e.level, message=e.message, fields=e.fields))
            for e in sandbox.events.since(request.start_at, request.limit)
        ]
        return pb.LogsResponse(entries=entries)

    @rpc_errors
    def Fork(self, request: pb.ForkRequest, context: grpc.ServicerContext) -> pb.ForkResponse:
        forks = self.manager.fork(request.sandbox_id, request.n or 1, self._tenant(context))
        return pb.ForkResponse(sandboxes=[info_to_pb(s) for s in forks])


def _snapshot_ref(meta: dict) -> pb.SnapshotRef:
    return wire.to_pb(SnapshotInfo(**{k: v for k, v in meta.items() if k in SnapshotInfo.model_fields}))


def info_to_pb(sandbox: ManagedSandbox) -> pb.SandboxInfo:
    return wire.to_pb(SandboxInfo(
        id=sandbox.sandbox_id, spec=sandbox.spec, state=sandbox.state, created_at=sandbox.created_at,
        expires_at=sandbox.expires_at, driver=sandbox.driver_name, accel=getattr(sandbox.handle, "accel", "") or "",
        timings_ms=sandbox.timings_ms, image_digest=sandbox.image.digest,
        start_command=sandbox.image.config.start_command,
    ))  # fmt: skip


def pool_to_pb(pool) -> pb.PoolInfo:  # pool: dsec.server.pools.Pool
    spec = pool.spec
    return wire.to_pb(PoolInfo(
        image=pool.config.image, substrate=spec.substrate, driver=pool.key.driver, **spec.resources.model_dump(),
        network_allow=spec.network_allow, size=pool.size, ready=len(pool.ready), filling=pool.filling,
        claims=pool.claims, misses=pool.misses, last_error=pool.last_error, image_digest=pool.key.digest,
        max_size=pool.max_size, target=pool.target(time.monotonic()),
    ))  # fmt: skip
