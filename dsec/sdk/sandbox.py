"""`Sandbox`: the object users hold. Same methods on every substrate."""

from __future__ import annotations

import inspect
import os
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle

from pydantic import ValidationError

from dsec import wire
from dsec.errors import CallTimeout, DsecError, InvalidSpec, OutOfMemory, RuntimeFailure
from dsec.models import (
    ExecResult, FileEntry, ReadyProbe, SandboxInfo, SandboxLogEntry, SandboxMetrics, SandboxSpec, VolumeMount,
)
from dsec.sdk.fs_ops import FileOps
from dsec.sdk.ports import PortConnection
from dsec.sdk.processes import Processes
from dsec.sdk.results import decode_result
from dsec.sdk.steps import next_step_key
from dsec.sdk.transport import Connection, default_connection
from dsec.v1 import sandbox_pb2 as pb

CHUNK = 1 << 20
Command = str | list[str]


def _step_key(kind: str) -> pb.StepKey | None:
    """The next trajectory step, when called inside `dsec.trajectory(...)`."""
    return next_step_key(kind)


def _with_step(message: Any, kind: str) -> Any:
    key = _step_key(kind)
    if key is not None:
        message.step.CopyFrom(key)
    return message


def _result_from_events(events, on_stdout=None, on_stderr=None) -> ExecResult:
    record = pb.ExecRecord()
    stdout, stderr = bytearray(), bytearray()
    for event in events:
        which = event.WhichOneof("event")
        if which == "stdout":
            stdout += event.stdout
            if on_stdout:
                on_stdout(event.stdout)
        elif which == "stderr":
            stderr += event.stderr
            if on_stderr:
                on_stderr(event.stderr)
        else:
            record.status.CopyFrom(event.status)
    record.stdout, record.stderr = bytes(stdout), bytes(stderr)
    return _result_from_record(record)


def _result_from_record(record: pb.ExecRecord) -> ExecResult:
    if not record.HasField("status"):
        raise RuntimeFailure("the server ended the exec without a final status")
    result = wire.exec_result(record)
    if result.oom_killed:
        limit = record.status.memory_limit_mb
        error = OutOfMemory(
            f"command was killed by the out-of-memory killer (sandbox memory limit {limit} MB)",
            memory_limit_mb=limit,
        )
        error.result = result  # type: ignore[attr-defined]
        raise error
    return result


def _rpc_deadline(timeout: float | None) -> float | None:
    return None if not timeout else timeout + 30.0


class Files(FileOps):
    """`sb.files`: read, write and list files inside the sandbox (streamed; large files are fine); stat, make_dir,
    rename, remove, list_tree and watch come from FileOps (dsec/sdk/fs_ops.py)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def read_stream(self, path: str) -> Iterator[bytes]:
        request = pb.FileRequest(sandbox_id=self._sb.id, path=path)
        for chunk in self._sb._client.stream(self._sb._client.sandboxes.ReadFile, request):
            yield chunk.data

    def read(self, path: str) -> bytes:
        return b"".join(self.read_stream(path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def write(self, path: str, data: bytes | str, mode: int = 0o644, make_parents: bool = True) -> int:
        content = data.encode() if isinstance(data, str) else bytes(data)
        header = _with_step(
            pb.WriteFileHeader(sandbox_id=self._sb.id, path=path, mode=mode, make_parents=make_parents), "write_file"
        )

        def requests() -> Iterator[pb.WriteFileRequest]:
            yield pb.WriteFileRequest(header=header)
            for start in range(0, len(content), CHUNK):
                yield pb.WriteFileRequest(data=content[start : start + CHUNK])

        return self._sb._client.client_stream(self._sb._client.sandboxes.WriteFile, requests()).size_bytes

    def list(self, path: str = "/") -> list[FileEntry]:
        reply = self._sb._client.rpc(self._sb._client.sandboxes.ListDir, pb.FileRequest(sandbox_id=self._sb.id, path=path))
        return [wire.from_pb_as(FileEntry, entry) for entry in reply.entries]


class Session:
    """A persistent shell: cwd, environment and shell variables carry over between `run` calls."""

    def __init__(self, sandbox: Sandbox, ref: pb.SessionRef) -> None:
        self._sb = sandbox
        self._ref = ref
        self.id = ref.session_id

    def run(self, command: str, timeout: float | None = None, on_stdout=None, on_stderr=None) -> ExecResult:
        request = _with_step(pb.RunInSessionRequest(session=self._ref, command=command, timeout_s=timeout or 0.0), "session")
        events = self._sb._client.stream(self._sb._client.sandboxes.RunInSession, request, _rpc_deadline(timeout))
        return _result_from_events(events, on_stdout, on_stderr)

    def close(self) -> None:
        self._sb._client.rpc(self._sb._client.sandboxes.CloseSession, self._ref)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        except DsecError:
            pass


def _register_by_value(fn: Callable) -> None:
    """Pickle the function's own module by value, so code from the caller's files runs in the sandbox
    without that file being there; stdlib and installed packages stay pickled by reference."""
    module = inspect.getmodule(fn)
    if module is None or module.__name__ in ("__main__",) or module.__name__ in sys.builtin_module_names:
        return
    path = getattr(module, "__file__", None) or ""
    stdlib = sysconfig.get_paths()["stdlib"]
    if not path or path.startswith(stdlib) or "site-packages" in path or "dist-packages" in path:
        return
    cloudpickle.register_pickle_by_value(module)


class Sandbox:
    """A sandbox on any substrate. Create with `Sandbox.create(...)` or `client.create(...)`."""

    def __init__(self, client: Connection, info: SandboxInfo, *, trust_results: bool = False) -> None:
        self._client = client
        self.info = info
        self.id = info.id
        self.trust_results = trust_results
        self.files = Files(self)
        self.processes = Processes(self)

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        image: str = "busybox",
        substrate: str = "container",
        *,
        client: Connection | None = None,
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
        """Create a sandbox (on `client`, else the process-wide connection); validated locally first so a typo
        fails before any RPC. `on_timeout="pause"` pauses it when `timeout_s` expires instead of destroying it
        (resume gives it a whole timeout again); `auto_resume` makes any call on a paused sandbox resume it first;
        `idle_timeout_s` ends it (SandboxExpired reason "idle") after that long without a call. `template` starts
        it from a ready template (client.templates); `ready` (a ReadyProbe) runs the image's start command and
        returns only once the probe passes (else SandboxNotReady, the sandbox destroyed)."""
        client = client or default_connection()
        resources = {
            k: v for k, v in {"cpu": cpu, "memory_mb": memory_mb, "pids": pids, "disk_mb": disk_mb}.items() if v is not None
        }
        try:
            spec = SandboxSpec(
                image=image,
                substrate=substrate,
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
        info = wire.from_pb_as(SandboxInfo, client.rpc(client.sandboxes.Create, request))
        return cls(client, info, trust_results=trust_results)

    @classmethod
    def connect(cls, sandbox_id: str, *, client: Connection | None = None, trust_results: bool = False) -> Sandbox:
        """Re-attach to a live sandbox by id (e.g. after the rollout process restarted)."""
        client = client or default_connection()
        info = client.rpc(client.sandboxes.Get, pb.SandboxRef(sandbox_id=sandbox_id))
        return cls(client, wire.from_pb_as(SandboxInfo, info), trust_results=trust_results)

    @classmethod
    def restore(
        cls, snapshot_id: str, *, client: Connection | None = None, labels: dict[str, str] | None = None,
        timeout_s: float = 0.0,
    ) -> Sandbox:
        """A new sandbox from a snapshot (`Sandbox.snapshot`, `client.pull_snapshot`)."""
        client = client or default_connection()
        request = pb.RestoreRequest(snapshot_id=snapshot_id, labels=labels or {}, timeout_s=timeout_s)
        return cls(client, wire.from_pb_as(SandboxInfo, client.rpc(client.sandboxes.Restore, request)))

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, image={self.info.spec.image!r}, substrate={self.info.spec.substrate!r})"

    # -- lifecycle -----------------------------------------------------------------------------------------
    def _update(self, method: Callable[..., pb.SandboxInfo], request: Any) -> SandboxInfo:
        self.info = wire.from_pb_as(SandboxInfo, self._client.rpc(method, request))
        return self.info

    def refresh(self) -> SandboxInfo:
        return self._update(self._client.sandboxes.Get, pb.SandboxRef(sandbox_id=self.id))

    def destroy(self) -> None:
        self._client.rpc(self._client.sandboxes.Destroy, pb.SandboxRef(sandbox_id=self.id))

    def set_timeout(self, timeout_s: float) -> None:
        """End the sandbox `timeout_s` from now (sooner or later than before)."""
        self._update(self._client.sandboxes.SetTimeout, pb.SetTimeoutRequest(sandbox_id=self.id, timeout_s=timeout_s))

    def keep_alive(self, timeout_s: float) -> float:
        """Extend: the sandbox lives at least `timeout_s` more (never less than it already would) and its idle
        clock restarts. Returns the new end (unix seconds). A sandbox that already ended raises SandboxExpired."""
        request = pb.SetTimeoutRequest(sandbox_id=self.id, timeout_s=timeout_s, extend=True)
        return self._update(self._client.sandboxes.SetTimeout, request).expires_at

    def pause(self, memory: bool | None = None) -> None:
        """Pause the sandbox (docs/lifecycle.md). memory=None: freeze its processes in place (RAM stays held,
        instant); True: save processes and memory to disk so it holds no CPU and no RAM (Unsupported, with the
        reason, where the substrate or host cannot); False: keep its files only (processes end; resume restarts
        it). `resume()`, or any call when it was created with auto_resume, brings it back."""
        kind = {None: "freeze", True: "memory", False: "files"}[memory]
        self._update(self._client.sandboxes.Pause, pb.PauseRequest(sandbox_id=self.id, kind=kind))

    def metrics(self) -> SandboxMetrics:
        """CPU (% since the previous call), memory and disk use now; `Unsupported` on the Docker driver."""
        return wire.from_pb_as(SandboxMetrics, self._client.rpc(self._client.sandboxes.Metrics, pb.SandboxRef(sandbox_id=self.id)))

    def logs(self, start: float = 0.0, limit: int = 0) -> list[SandboxLogEntry]:
        """What happened to this sandbox (created, commands and their exit, pause/resume, timeouts), oldest first."""
        reply = self._client.rpc(self._client.sandboxes.Logs, pb.LogsRequest(sandbox_id=self.id, start_at=start, limit=limit))
        return [wire.from_pb_as(SandboxLogEntry, entry) for entry in reply.entries]

    def resume(self) -> None:
        self._update(self._client.sandboxes.Resume, pb.SandboxRef(sandbox_id=self.id))

    def snapshot(self, name: str = "", ttl_s: float = 0.0) -> str:
        """Snapshot the sandbox; returns a snapshot id for `Sandbox.restore`. `ttl_s` > 0: the server's snapshot
        GC removes it that long from now (docs/lifecycle.md)."""
        request = pb.SnapshotRequest(sandbox_id=self.id, name=name, ttl_s=ttl_s)
        return self._client.rpc(self._client.sandboxes.Snapshot, request).snapshot_id

    def connect_port(self, port: int) -> PortConnection:
        """A socket-like connection to `127.0.0.1:port` inside the sandbox (a server you started there);
        raises PortUnreachable while nothing listens, Unsupported in a VM whose image lacks python3."""
        return PortConnection(self._client, self.id, port)

    def fork(self, n: int = 1) -> list[Sandbox]:
        reply = self._client.rpc(self._client.sandboxes.Fork, pb.ForkRequest(sandbox_id=self.id, n=n))
        return [Sandbox(self._client, wire.from_pb_as(SandboxInfo, info), trust_results=self.trust_results) for info in reply.sandboxes]

    # -- exec -------------------------------------------------------------------------------------------------
    def exec(
        self,
        command: Command,
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        max_output_bytes: int = 0,
    ) -> ExecResult:
        """Run a command (a string runs via /bin/sh -c; a list is the exact argv).

        On timeout the result has `timed_out=True` and the output produced so far; an OOM kill raises
        OutOfMemory (with `.result`). `on_stdout`/`on_stderr` receive chunks as they arrive.
        """
        request = pb.ExecRequest(
            sandbox_id=self.id,
            env=env or {},
            cwd=cwd or "",
            stdin=stdin.encode() if isinstance(stdin, str) else (stdin or b""),
            timeout_s=timeout or 0.0,
            max_output_bytes=max_output_bytes,
        )
        if isinstance(command, str):
            request.command = command
        else:
            request.argv.extend(command)
        _with_step(request, "exec")
        deadline = _rpc_deadline(timeout)
        if on_stdout is None and on_stderr is None:  # only the result is wanted: one reply, no stream
            record = self._client.unary_if_served(self._client.execs.ExecCollect, request, deadline)
            if record is not None:
                return _result_from_record(record)
        events = self._client.stream(self._client.execs.Exec, request, deadline)
        return _result_from_events(events, on_stdout, on_stderr)

    def session(
        self, *, env: dict[str, str] | None = None, cwd: str = "", shell: str = "", on_timeout: str = "interrupt"
    ) -> Session:
        """A persistent shell. A command past its `timeout` is interrupted (SIGINT, then SIGKILL) and the shell
        keeps its cwd, env and `$?`; `on_timeout="kill_session"` kills the shell instead (the session ends)."""
        request = pb.StartSessionRequest(sandbox_id=self.id, env=env or {}, cwd=cwd, shell=shell, on_timeout=on_timeout)
        ref = self._client.rpc(self._client.sandboxes.StartSession, request)
        return Session(self, ref)

    # -- trees --------------------------------------------------------------------------------------------------
    def upload(self, local_path: str | os.PathLike, remote_dir: str) -> int:
        """Copy a local file or directory into `remote_dir` (created if missing)."""
        local = Path(local_path)
        if not local.exists():
            raise FileNotFoundError(local)
        with tempfile.TemporaryFile() as spool:
            with tarfile.open(fileobj=spool, mode="w") as tar:
                tar.add(str(local), arcname=local.name)
            spool.seek(0)
            header = _with_step(pb.UploadHeader(sandbox_id=self.id, path=remote_dir), "upload")

            def requests() -> Iterator[pb.UploadRequest]:
                yield pb.UploadRequest(header=header)
                while chunk := spool.read(CHUNK):
                    yield pb.UploadRequest(data=chunk)

            return self._client.client_stream(self._client.sandboxes.Upload, requests()).size_bytes

    def download(self, remote_path: str, local_dir: str | os.PathLike) -> Path:
        """Copy a file or directory out of the sandbox into `local_dir`; returns the local path.

        The archive comes from untrusted code, so it is unpacked with tarfile's 'data' filter: no absolute
        paths, no `..`, no links or devices pointing outside `local_dir`.
        """
        dest = Path(local_dir)
        dest.mkdir(parents=True, exist_ok=True)
        request = pb.FileRequest(sandbox_id=self.id, path=remote_path)
        with tempfile.TemporaryFile() as spool:
            for chunk in self._client.stream(self._client.sandboxes.Download, request):
                spool.write(chunk.data)
            spool.seek(0)
            with tarfile.open(fileobj=spool, mode="r") as tar:
                tar.extractall(dest, filter="data")
        return dest / Path(remote_path.rstrip("/")).name

    # -- functions ------------------------------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run `fn(*args, **kwargs)` inside a function sandbox; returns its value or raises its exception."""
        return self.call_with_options(fn, args, kwargs)

    def call_with_options(
        self,
        fn: Callable[..., Any],
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        memory_mb: int | None = None,
    ) -> Any:
        """`call` with a per-call time limit (CallTimeout) and extra-memory limit (OutOfMemory)."""
        _register_by_value(fn)
        payload = cloudpickle.dumps((fn, tuple(args), dict(kwargs or {})))
        request = _with_step(
            pb.CallRequest(sandbox_id=self.id, payload=payload, timeout_s=timeout or 0.0, memory_mb=memory_mb or 0), "call"
        )
        reply = self._client.rpc(self._client.sandboxes.Call, request, _rpc_deadline(timeout))
        self.last_call_output = (reply.stdout, reply.stderr)
        if not reply.is_error:
            return decode_result(reply.result, self.trust_results)
        if reply.error_type == "CallTimeout":
            raise CallTimeout(f"call to {getattr(fn, '__name__', fn)} in sandbox {self.id} exceeded {timeout}s")
        if reply.error_type in ("MemoryError", "OutOfMemory"):
            # name the limit that was hit, as an exec's OutOfMemory does: the call's extra allowance or the sandbox's
            limit = self.info.spec.resources.memory_mb
            which = f"call allowance {memory_mb} MB above the worker's size" if memory_mb else f"sandbox memory limit {limit} MB"
            raise OutOfMemory(
                f"call to {getattr(fn, '__name__', fn)} in sandbox {self.id} ran out of memory ({which}):\n{reply.traceback}",
                memory_limit_mb=memory_mb or limit,
            )
        try:
            error = decode_result(reply.result, self.trust_results) if reply.result else None
        except Exception:  # noqa: BLE001 - unsafe or unknown exception class: fall back to the traceback text
            error = None
        if not isinstance(error, BaseException):
            error = RuntimeFailure(f"{reply.error_type} in sandbox {self.id}")
        error.remote_traceback = reply.traceback  # type: ignore[attr-defined]
        if hasattr(error, "add_note"):
            error.add_note(f"remote traceback (sandbox {self.id}):\n{reply.traceback}")
        raise error

