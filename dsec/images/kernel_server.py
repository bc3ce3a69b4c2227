"""The code-interpreter image's kernel server: runs *inside* the sandbox, on port 49999.

Why it exists: `e2b-code-interpreter`'s `Sandbox.run_code` posts to a small HTTP server on port 49999 of its
template (reached through the front door's port proxy). This is dsec's own implementation of the routes that
SDK calls, on the standard library plus `jupyter_client`/`ipykernel` from Debian: one IPython kernel per
context, so state persists between calls.

Routes (bodies as the SDK sends and parses them, e2b_code_interpreter/code_interpreter_sync.py, models.py):
  GET  /health                    → 200
  POST /execute {code, context_id, language, env_vars}
                                  → NDJSON stream: {"type": "stdout"|"stderr", "text", "timestamp"},
                                    {"type": "result", <mime fields>, "is_main_result"},
                                    {"type": "error", "name", "value", "traceback"},
                                    {"type": "number_of_executions", "execution_count"}
  POST /contexts {language, cwd}  → {"id", "language", "cwd"}
  GET  /contexts                  → [context, ...]
  DELETE /contexts/{id}           → 204
  POST /contexts/{id}/restart     → 204
Only Python contexts exist (other languages → 400, docs/ports.md). A client that disconnects mid-execution
(the SDK's timeout) interrupts the kernel, so the next call is not stuck behind it.

`--daemon` is the image's start command: it forks the server, waits until the default kernel is ready and
the port is bound, then exits 0 (or 1 with the server's log), so whoever starts it knows it is ready. It is
idempotent (a server already answering → exit 0), so it can run again after a fork or a restore.
Run with `python3 kernel_server.py [--port 49999] [--daemon]`; never imported by dsec itself.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import select
import sys
import threading
import time
import traceback
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = 49999
DEFAULT_CWD = "/home/user"
LOG = "/tmp/dsec-kernel-server.log"
KERNEL_READY_S = 120.0
MAX_BODY = 16 << 20
# Jupyter MIME bundle → the field names of e2b_code_interpreter.models.Result
MIME_FIELDS = {
    "text/plain": "text", "text/html": "html", "text/markdown": "markdown", "image/svg+xml": "svg",
    "image/png": "png", "image/jpeg": "jpeg", "application/pdf": "pdf", "text/latex": "latex",
    "application/json": "json", "application/javascript": "javascript",
}  # fmt: skip
PYTHON_NAMES = (None, "", "python", "python3")


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Context:
    """One IPython kernel. Executions are serialized: a kernel runs one cell at a time anyway."""

    def __init__(self, cwd: str) -> None:
        from jupyter_client import KernelManager  # only inside the sandbox image

        self.id = uuid.uuid4().hex
        self.cwd = cwd
        self.language = "python"
        self.lock = threading.Lock()
        os.makedirs(cwd, exist_ok=True)
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(cwd=cwd)
        self.client = self.manager.blocking_client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=KERNEL_READY_S)

    def describe(self) -> dict:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def restart(self) -> None:
        with self.lock:
            self.client.stop_channels()
            self.manager.restart_kernel(now=True)
            self.client = self.manager.blocking_client()
            self.client.start_channels()
            self.client.wait_for_ready(timeout=KERNEL_READY_S)

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)

    def _run_silently(self, code: str) -> None:
        msg_id = self.client.execute(code, silent=True, store_history=False, allow_stdin=False, stop_on_error=False)
        self._drain(msg_id, lambda _event: True, lambda: False)

    def _drain(self, msg_id: str, emit, gone) -> None:
        """Relay this execution's IOPub messages until the kernel is idle; interrupt it if the caller is gone."""
        interrupted = False
        while True:
            try:
                message = self.client.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                if not interrupted and gone():
                    self.manager.interrupt_kernel()
                    interrupted = True
                continue
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "status" and content.get("execution_state") == "idle":
                return
            event = _event(kind, content)
            if event is not None and not interrupted:
                if not emit(event):
                    self.manager.interrupt_kernel()
                    interrupted = True

    def execute(self, code: str, env_vars: dict[str, str], emit, gone) -> None:
        """Run `code`; `emit(event) -> bool` sends one NDJSON event (False: the caller went away)."""
        with self.lock:
            if env_vars:
                self._run_silently(
                    "import os as _dsec_os\n"
                    f"_dsec_saved_env = {{k: _dsec_os.environ.get(k) for k in {list(env_vars)!r}}}\n"
                    f"_dsec_os.environ.update({dict(env_vars)!r})\n"
                )
            try:
                # stop_on_error=False: after an error ipykernel aborts requests that reach it too soon, so the next
                # run_code would sometimes come back empty
                msg_id = self.client.execute(code, store_history=True, allow_stdin=False, stop_on_error=False)
                self._drain(msg_id, emit, gone)
                reply = self._reply(msg_id)
                if reply is not None and "execution_count" in reply:
                    emit({"type": "number_of_executions", "execution_count": reply["execution_count"]})
            finally:
                if env_vars:
                    self._run_silently(
                        "for _k, _v in _dsec_saved_env.items():\n"
                        "    _dsec_os.environ.pop(_k, None) if _v is None else _dsec_os.environ.__setitem__(_k, _v)\n"
                    )

    def _reply(self, msg_id: str) -> dict | None:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                message = self.client.get_shell_msg(timeout=1.0)
            except queue.Empty:
                continue
            if message.get("parent_header", {}).get("msg_id") == msg_id:
                return message["content"]
        return None


def _event(kind: str, content: dict) -> dict | None:
    now = time.time_ns()
    if kind == "stream":
        return {"type": "stdout" if content.get("name") == "stdout" else "stderr", "text": content.get("text", ""), "timestamp": now}
    if kind in ("execute_result", "display_data"):
        result = {field: content["data"][mime] for mime, field in MIME_FIELDS.items() if mime in content.get("data", {})}
        extra = {mime: value for mime, value in content.get("data", {}).items() if mime not in MIME_FIELDS}
        if extra:
            result["extra"] = extra
        return {"type": "result", **result, "is_main_result": kind == "execute_result"}
    if kind == "error":
        return {"type": "error", "name": content.get("ename", ""), "value": content.get("evalue", ""),
                "traceback": "\n".join(content.get("traceback", []))}  # fmt: skip
    return None


class Kernels:
    """The contexts of this sandbox; "python" is the default context of `run_code` without one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.contexts: dict[str, Context] = {}
        self.default = self.create(None, DEFAULT_CWD if os.path.isdir(os.path.dirname(DEFAULT_CWD)) else "/")

    def create(self, language: str | None, cwd: str | None) -> Context:
        if language not in PYTHON_NAMES:
            raise HttpError(400, f"language {language!r} is not supported by dsec's code interpreter: only python")
        context = Context(cwd or DEFAULT_CWD)
        with self.lock:
            self.contexts[context.id] = context
        return context

    def get(self, context_id: str) -> Context:
        with self.lock:
            context = self.contexts.get(context_id)
        if context is None:
            raise HttpError(404, f"context {context_id} not found")
        return context

    def remove(self, context_id: str) -> None:
        context = self.get(context_id)
        with self.lock:
            self.contexts.pop(context_id, None)
        context.shutdown()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    kernels: Kernels

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        sys.stderr.write("%s %s\n" % (self.address_string(), format % args))

    def _json(self, status: int, body) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _empty(self, status: int = 204) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise HttpError(413, f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            raise HttpError(400, f"request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "request body must be a JSON object")
        return body

    def _route(self, method: str) -> None:
        try:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            parts = path.strip("/").split("/")
            if method == "GET" and path == "/health":
                self._json(200, "OK")
            elif method == "POST" and path == "/execute":
                self._execute(self._body())
            elif method == "POST" and path == "/contexts":
                body = self._body()
                self._json(200, self.kernels.create(body.get("language"), body.get("cwd")).describe())
            elif method == "GET" and path == "/contexts":
                with self.kernels.lock:
                    self._json(200, [c.describe() for c in self.kernels.contexts.values()])
            elif method == "DELETE" and len(parts) == 2 and parts[0] == "contexts":
                self.kernels.remove(parts[1])
                self._empty()
            elif method == "POST" and len(parts) == 3 and parts[0] == "contexts" and parts[2] == "restart":
                self.kernels.get(parts[1]).restart()
                self._empty()
            else:
                raise HttpError(404, f"no route {method} {path}")
        except HttpError as exc:
            self._json(exc.status, {"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - answer, never drop the connection without a status
            traceback.print_exc()
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"})

    def _execute(self, body: dict) -> None:
        code = body.get("code")
        if not isinstance(code, str):
            raise HttpError(400, "`code` (a string) is required")
        env_vars = body.get("env_vars") or {}
        if not isinstance(env_vars, dict) or not all(isinstance(v, str) for v in env_vars.values()):
            raise HttpError(400, "`env_vars` must map names to strings")
        if body.get("context_id"):
            context = self.kernels.get(body["context_id"])
        elif body.get("language") in PYTHON_NAMES:
            context = self.kernels.default
        else:
            raise HttpError(400, f"language {body.get('language')!r} is not supported by dsec's code interpreter: only python")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        alive = [True]

        def emit(event: dict) -> bool:
            if not alive[0]:
                return False
            line = json.dumps(event).encode() + b"\n"
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            except OSError:
                alive[0] = False
            return alive[0]

        def gone() -> bool:
            """The client closed its connection (readable with no data = EOF)."""
            if not alive[0]:
                return True
            readable, _, _ = select.select([self.connection], [], [], 0)
            if readable:
                try:
                    alive[0] = bool(self.connection.recv(1, 0x02))  # MSG_PEEK
                except OSError:
                    alive[0] = False
            return not alive[0]

        try:
            context.execute(code, {str(k): v for k, v in env_vars.items()}, emit, gone)
        except Exception as exc:  # noqa: BLE001 - the response has started: report it as the cell's error
            traceback.print_exc()
            emit({"type": "error", "name": type(exc).__name__, "value": str(exc), "traceback": traceback.format_exc()})
        if alive[0]:
            try:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                pass
        self.close_connection = True

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")


def serve(port: int, ready_fd: int = -1) -> None:
    Handler.kernels = Kernels()
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    if ready_fd >= 0:
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
    server.serve_forever()


def serving(port: int) -> bool:
    """Whether a kernel server already answers on `port` (a forked or resumed sandbox keeps its own)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def daemonize(port: int) -> int:
    """Fork the server into its own session; return 0 once it serves, 1 (with its log) if it fails.
    Idempotent: when a server already answers on the port, return 0 at once."""
    if serving(port):
        return 0
    read_fd, write_fd = os.pipe()
    if os.fork() == 0:
        os.close(read_fd)
        os.setsid()  # out of the starter's process group: a signal to the starter does not reach it
        log = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        try:
            serve(port, write_fd)
        finally:
            os._exit(1)
    os.close(write_fd)
    ready = select.select([read_fd], [], [], KERNEL_READY_S + 30)[0]
    if ready and os.read(read_fd, 2) == b"ok":
        return 0
    sys.stderr.write(f"the kernel server did not start; {LOG}:\n")
    try:
        with open(LOG) as handle:
            sys.stderr.write(handle.read()[-4000:])
    except OSError:
        pass
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dsec's code-interpreter kernel server (runs in the sandbox)")
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--daemon", action="store_true", help="fork, wait until serving, exit 0")
    parser.add_argument("--build", default="", help="content hash of this file (names the image's build; unused)")
    args = parser.parse_args(argv)
    if args.daemon:
        return daemonize(args.port)
    serve(args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
