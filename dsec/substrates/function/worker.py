"""In-sandbox function worker (runs with the image's python3; only stdlib + the bundled cloudpickle).

Why pre-fork: the parent imports cloudpickle once and keeps one forked spare child waiting, so a call
costs a pipe write and a fork that already happened, not an interpreter start. Why a child per call:
each call starts from the same clean parent state, so globals, imported modules and monkeypatches of
one call never leak into the next, and a crash, timeout or MemoryError kills only that child.

Wire (host ↔ this process, over its stdin/stdout): frames of a 4-byte big-endian length + payload.
Request payload: a JSON header line (timeout_s, memory_mb) + b"\n" + cloudpickle of (fn, args, kwargs).
Response payload: JSON with base64 fields; the host never unpickles anything, it only forwards bytes.
"""

import base64
import json
import os
import resource
import select
import signal
import struct
import sys
import time
import traceback

import cloudpickle

PROTOCOL_FD = os.dup(1)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)


def _read_exact(fd, size):
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _read_frame(fd):
    (size,) = struct.unpack(">I", _read_exact(fd, 4))
    return _read_exact(fd, size)


def _write_frame(fd, payload):
    data = struct.pack(">I", len(payload)) + payload
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _vm_size_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _run_call(request, result_fd):
    """Child side: decode, limit, run, and write one JSON response to `result_fd`."""
    header, _, payload = request.partition(b"\n")
    options = json.loads(header)
    out = os.memfd_create("stdout")
    err = os.memfd_create("stderr")
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    memory_mb = int(options.get("memory_mb") or 0)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if memory_mb > 0:
        # Soft limit only: lifting it again to report a MemoryError needs no privilege.
        limit = _vm_size_bytes() + memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    started = time.monotonic()
    response = {"is_error": False}
    try:
        fn, args, kwargs = cloudpickle.loads(payload)
        value = fn(*args, **kwargs)
        response["result"] = base64.b64encode(cloudpickle.dumps(value)).decode()
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the caller
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))  # room to format and pickle the error
        response["is_error"] = True
        response["error_type"] = type(exc).__name__
        response["traceback"] = traceback.format_exc()
        try:
            blob = cloudpickle.dumps(exc)
        except Exception:  # noqa: BLE001 - unpicklable exception: send its text instead
            blob = cloudpickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
        response["result"] = base64.b64encode(blob).decode()
    response["duration_s"] = time.monotonic() - started
    sys.stdout.flush()
    sys.stderr.flush()
    for name, fd in (("stdout", out), ("stderr", err)):
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        response[name] = base64.b64encode(b"".join(chunks)[-(1 << 20) :]).decode()
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    _write_frame(result_fd, json.dumps(response).encode())


def _fork_spare():
    """Fork a child that waits for one request on a pipe, runs it, and exits."""
    request_r, request_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(request_w)
        os.close(result_r)
        os.close(0)
        try:
            _run_call(_read_frame(request_r), result_w)
        finally:
            os._exit(0)
    os.close(request_r)
    os.close(result_w)
    return pid, request_w, result_r


def _collect(pid, result_r, timeout_s):
    """Parent side: read the child's response within the deadline, else kill it and say why."""
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    data = b""
    timed_out = False
    while True:
        wait = None if deadline is None else max(deadline - time.monotonic(), 0)
        ready, _, _ = select.select([result_r], [], [], wait)
        if not ready:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            break
        chunk = os.read(result_r, 1 << 20)
        if not chunk:
            break
        data += chunk
    os.close(result_r)
    _, status = os.waitpid(pid, 0)
    if timed_out:
        return {"is_error": True, "error_type": "CallTimeout", "traceback": f"call exceeded its {timeout_s}s time limit"}
    if len(data) >= 4:
        return json.loads(data[4:])
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return {"is_error": True, "error_type": "OutOfMemory", "traceback": "the call was killed (SIGKILL), most likely by the sandbox's memory limit"}
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
    return {"is_error": True, "error_type": "WorkerCrashed", "traceback": f"the call's process died without a result (status {code})"}


def main():
    spare = _fork_spare()
    _write_frame(PROTOCOL_FD, json.dumps({"ready": True, "pid": os.getpid()}).encode())
    while True:
        try:
            request = _read_frame(0)
        except EOFError:
            os.kill(spare[0], signal.SIGKILL)
            return
        pid, request_w, result_r = spare
        options = json.loads(request.partition(b"\n")[0])
        _write_frame(request_w, request)
        os.close(request_w)
        response = _collect(pid, result_r, float(options.get("timeout_s") or 0))
        _write_frame(PROTOCOL_FD, json.dumps(response).encode())
        spare = _fork_spare()


if __name__ == "__main__":
    main()
