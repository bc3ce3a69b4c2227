"""Host side of the function substrate: a container sandbox plus a warm worker process inside it."""

from __future__ import annotations

import json
import queue
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import cloudpickle

from dsec.config import ServerConfig
from dsec.errors import InvalidSpec, RuntimeFailure, Unsupported
from dsec.models import FileEntry, FileInfo, PauseKind, SandboxSpec
from dsec.substrates.base import DirWatch, DriverSandbox, Exited, ImageRootfs, Output, ProcessHandle, SandboxDriver, Usage

WORKER_DIR = "/.dsec-fn"
WORKER_START_TIMEOUT_S = 30.0
# Extra wait beyond a call's own limit before the host gives up on the worker (it enforces the limit itself).
HOST_GRACE_S = 15.0


def _worker_files() -> list[tuple[str, bytes]]:
    """The worker script and the pure-Python cloudpickle package, copied into each sandbox."""
    files = [(f"{WORKER_DIR}/worker.py", (Path(__file__).parent / "worker.py").read_bytes())]
    package = Path(cloudpickle.__file__).parent
    for path in sorted(package.glob("*.py")):
        files.append((f"{WORKER_DIR}/cloudpickle/{path.name}", path.read_bytes()))
    return files


class FunctionSandbox(DriverSandbox):
    """Delegates exec/files to the container and adds `call()` through the worker."""

    def __init__(self, inner: DriverSandbox) -> None:
        self.inner = inner
        self.sandbox_id = inner.sandbox_id
        self._call_lock = threading.Lock()
        self._worker: ProcessHandle | None = None
        self._frames: queue.Queue = queue.Queue()

    # -- worker lifecycle -------------------------------------------------------------------------
    def start_worker(self) -> None:
        for path, data in _worker_files():
            self.inner.write_file(path, [data], 0o644, True)
        env = {"PYTHONPATH": WORKER_DIR, "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/local/bin:/usr/bin:/bin"}
        try:
            self._worker = self.inner.spawn(["python3", "-u", f"{WORKER_DIR}/worker.py"], env, "/", stdin=True)
        except Exception as exc:
            raise InvalidSpec(
                f"the function substrate needs an image with python3 (e.g. image='python'): {exc}"
            ) from exc
        self._frames = queue.Queue()
        threading.Thread(target=self._read_frames, args=(self._worker, self._frames), daemon=True).start()
        hello = self._next_frame(WORKER_START_TIMEOUT_S)
        if not hello.get("ready"):
            raise RuntimeFailure(f"function worker in sandbox {self.sandbox_id} failed to start: {hello}")

    @staticmethod
    def _read_frames(worker: ProcessHandle, frames: queue.Queue) -> None:
        buffer, stderr = b"", b""
        try:
            for event in worker.events():
                if isinstance(event, Output) and event.stream == "stdout":
                    buffer += event.data
                    while len(buffer) >= 4:
                        (size,) = struct.unpack(">I", buffer[:4])
                        if len(buffer) < 4 + size:
                            break
                        frames.put(json.loads(buffer[4 : 4 + size]))
                        buffer = buffer[4 + size :]
                elif isinstance(event, Output):
                    stderr = (stderr + event.data)[-8192:]
                elif isinstance(event, Exited):
                    frames.put({"exited": event.exit_code, "stderr": stderr.decode(errors="replace")})
        except Exception as exc:  # noqa: BLE001 - surfaced to the waiting caller
            frames.put({"exited": -1, "stderr": str(exc)})

    def _next_frame(self, timeout_s: float | None) -> dict:
        try:
            frame = self._frames.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeFailure(f"function worker in sandbox {self.sandbox_id} did not answer in {timeout_s}s") from None
        if "exited" in frame:
            self._worker = None
            raise RuntimeFailure(
                f"function worker in sandbox {self.sandbox_id} exited ({frame['exited']}): {frame['stderr'][-2000:]}"
            )
        return frame

    def call(self, payload: bytes, timeout_s: float, memory_mb: int) -> dict:
        """Run one pickled call; returns the worker's JSON response (base64 result, error info, output)."""
        header = json.dumps({"timeout_s": timeout_s, "memory_mb": memory_mb}).encode()
        request = header + b"\n" + payload
        with self._call_lock:
            if self._worker is None:
                self.start_worker()
            assert self._worker is not None
            self._worker.write_stdin(struct.pack(">I", len(request)) + request)
            return self._next_frame(timeout_s + HOST_GRACE_S if timeout_s > 0 else None)

    # -- everything else is the container's ----------------------------------------------------------
    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        stdin: bool = False,
        pty: tuple[int, int] | None = None,
        user: tuple[int, int] | None = None,
    ) -> ProcessHandle:
        return self.inner.spawn(argv, env, cwd, stdin, pty=pty, user=user)

    def launch(self, argv: list[str], env: dict[str, str], cwd: str) -> ProcessHandle:
        return self.inner.launch(argv, env, cwd)

    def read_file(self, path: str) -> Iterator[bytes]:
        return self.inner.read_file(path)

    def write_file(self, path: str, chunks: Iterable[bytes], mode: int = 0o644, make_parents: bool = True) -> int:
        return self.inner.write_file(path, chunks, mode, make_parents)

    def list_dir(self, path: str) -> list[FileEntry]:
        return self.inner.list_dir(path)

    def stat_info(self, path: str) -> FileInfo:
        return self.inner.stat_info(path)

    def list_dir_info(self, path: str) -> list[FileInfo]:
        return self.inner.list_dir_info(path)

    def make_dir(self, path: str, mode: int = 0o755, parents: bool = True, owner: tuple[int, int] | None = None) -> None:
        self.inner.make_dir(path, mode, parents, owner)

    def move(self, source: str, destination: str, make_parents: bool = True, owner: tuple[int, int] | None = None) -> None:
        self.inner.move(source, destination, make_parents, owner)

    def remove(self, path: str, recursive: bool = True) -> None:
        self.inner.remove(path, recursive)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.inner.chown(path, uid, gid)

    def watch_dir(self, path: str, recursive: bool = False) -> DirWatch:
        return self.inner.watch_dir(path, recursive)

    def oom_kill_count(self) -> int:
        return self.inner.oom_kill_count()

    def memory_limit_mb(self) -> int:
        return self.inner.memory_limit_mb()

    def usage(self) -> Usage:
        return self.inner.usage()

    def check_pause(self, kind: PauseKind) -> None:
        if kind != "freeze":
            raise Unsupported(
                f"function sandbox {self.sandbox_id} pauses by freezing only: its warm workers' connections would not "
                "survive a memory or files pause; call pause() without memory="
            )

    def pause(self, kind: PauseKind = "freeze") -> None:
        self.check_pause(kind)
        self.inner.pause()

    def resume(self) -> None:
        self.inner.resume()

    def snapshot(self, dest: Path) -> str:
        return self.inner.snapshot(dest)

    def netns_path(self) -> Path:
        return self.inner.netns_path()


class FunctionDriver(SandboxDriver):
    name = "function"
    substrate = "function"

    def __init__(self, inner: SandboxDriver, config: ServerConfig) -> None:
        self.inner = inner
        self.config = config

    def create(self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, state_dir: Path) -> FunctionSandbox:
        handle = self.inner.create(sandbox_id, spec, image, state_dir)
        sandbox = FunctionSandbox(handle)
        try:
            started = time.monotonic()
            sandbox.start_worker()
            sandbox.worker_start_s = time.monotonic() - started  # type: ignore[attr-defined]
        except BaseException:
            self.inner.destroy(handle)
            raise
        return sandbox

    def destroy(self, sandbox: DriverSandbox) -> None:
        inner = sandbox.inner if isinstance(sandbox, FunctionSandbox) else sandbox
        self.inner.destroy(inner)

    def cleanup_state_dir(self, state_dir: Path) -> None:
        self.inner.cleanup_state_dir(state_dir)

    def adopt(self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, state_dir: Path, paused: bool) -> DriverSandbox:
        """The container re-attached; its worker died with the dead server's agent connection (the agent kills a
        connection's processes), so a new one starts now, or at the first call if the sandbox is paused."""
        handle = self.inner.adopt(sandbox_id, spec, image, state_dir, paused)
        sandbox = FunctionSandbox(handle)
        if not paused:
            try:
                sandbox.start_worker()
            except BaseException:
                self.inner.destroy(handle)
                raise
        return sandbox

    def restore(self, sandbox_id: str, spec: SandboxSpec, image: ImageRootfs, snapshot: Path, state_dir: Path) -> DriverSandbox:
        sandbox = FunctionSandbox(self.inner.restore(sandbox_id, spec, image, snapshot, state_dir))
        sandbox.start_worker()
        return sandbox
