"""In-sandbox warm Python: one interpreter per sandbox that forks a child for each `python3 -c CODE` or
`python3 FILE` the rollout's tools and verifiers run (started by trainer.warm_python; stdlib only, run by the
image's python3 as `python3 -c <this source> [module ...]`).

Why: a fresh CPython start costs ~9-10 ms of CPU in the sandbox before the first line of a tool's code runs
(~28 ms when the code imports unittest), and a rollout starts two or three of them on the cores the sampler
shares. Through this, the same call costs ~4.5-6 ms (the shim's sh and mkfifo ~2, the fork and the child's set-up
and exit ~2.5; with unittest already imported, ~6.5 ms instead of ~28). Each call is a fresh fork of this clean
parent, which never runs user code, so nothing one call does reaches another. The child ends as the interpreter
ends (non-daemon threads joined, atexit functions, stdout flushed with the interpreter's error report and status
120 on failure) but skips tearing its modules down, most of a fork's cost: objects' `__del__` at interpreter
shutdown do not run.

How a call gets here: the parent writes `python3` into /usr/local/bin (ahead of /usr/bin on the image's PATH) as
a small sh script, the shim. The shim sends its pid over a FIFO and waits on a FIFO of its own. The parent reads
the shim's argv, environment, cwd, umask, limits and ids from /proc and either answers `fallback` (the shim then
execs the real /usr/bin/python3: any form or setting this does not reproduce exactly) or forks a child that opens
the shim's own stdin/stdout/stderr (pipes or character devices only), takes over its cwd, environment, umask and
limits, and runs the code as `__main__` the way the interpreter does (tracebacks, SystemExit, exit codes, atexit).
The parent sends the child's exit status back and the shim exits with it (or kills itself with the child's
signal). A shim that dies first (a tool timeout kills its process group) takes the child with it.

What differs from a fresh interpreter, by construction: the modules this parent imported (its start-up set plus
the named ones) are already in `sys.modules`; every child shares the parent's str hash seed (a fresh process
draws its own); `sys.orig_argv` and the parent pid are the parent's; the child leads a session of its own (so a
timeout kills what it started); file descriptors other than 0-2 are not inherited from the caller; when the real
interpreter is used instead, its argv[0] is /usr/bin/python3 (sh cannot set it), which shows in a usage message. Nothing the task families run can see these; tests/trainer/test_warm_python.py
compares stdout, stderr and exit codes with the real interpreter on generated problems of every family.
"""

import os
import select
import signal
import stat
import sys

DIR = "/.dsec-py"
SHIM = "/usr/local/bin/python3"
REAL = "/usr/bin/python3"
# variables a shell sets or changes by itself; any other difference from this parent's environment can change how
# an interpreter starts (PYTHON*, locale, HOME for the user site) and sends the call to the real interpreter
SHELL_VARS = ("PWD", "OLDPWD", "SHLVL", "_")
IGNORED_BY_PYTHON = {signal.SIGPIPE, signal.SIGXFSZ}  # an interpreter ignores these itself at start-up
STDIO = (7, 8, 9)  # the shim's copies of its stdin, stdout, stderr (see SHIM_TEXT)

SHIM_TEXT = f"""#!/bin/sh
# dsec warm python (trainer/warm_python_server.py): runs `python3 -c CODE` and `python3 FILE` in a fork of an
# interpreter that has already started; anything else, or no such interpreter, runs {REAL}.
# fds 7-9 keep this shell's stdio while `echo` and `read` redirect it (the server reads them from /proc).
d={DIR}
if [ -e /proc/self/fd/0 ] && [ -e /proc/self/fd/1 ] && [ -e /proc/self/fd/2 ] && read -r p 2>/dev/null <$d/pid &&
    [ -d /proc/"$p" ] && mkfifo $d/r$$ 2>/dev/null; then
  exec 3<>$d/r$$ 7<&0 8>&1 9>&2
  echo $$ >$d/req
  read -r s c <&3
  exec 3<&- 7<&- 8>&- 9>&-
  case $s in
    exit) exit "$c" ;;
    sig) kill -s "$c" $$; exit $((128 + c)) ;;
  esac
fi
exec {REAL} "$@"
"""


def _status_fields(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return fields


def _signal_bits(hex_mask, skip=()):
    mask = int(hex_mask, 16)
    return {s for s in range(1, 65) if mask >> (s - 1) & 1 and s not in skip}


class Call:
    """What one shim asked for, read from /proc before the fork."""

    def __init__(self, pid, own_env, own_ids):
        self.pid = pid
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")[:-1]
        self.args = [os.fsdecode(a) for a in argv[2:]]  # /bin/sh SHIM args...
        with open(f"/proc/{pid}/environ", "rb") as f:
            pairs = [item.partition(b"=") for item in f.read().split(b"\0") if item]
        self.env = {os.fsdecode(k): os.fsdecode(v) for k, _, v in pairs}
        self.cwd = os.readlink(f"/proc/{pid}/cwd")
        status = _status_fields(pid)
        self.umask = int(status["Umask"][0], 8)
        self.ids = (tuple(status["Uid"]), tuple(status["Gid"]), tuple(status["Groups"]))
        self.limits = [(r, _prlimit(pid, r)) for r in _LIMITS]
        self.reason = self._fallback_reason(status, own_env, own_ids)

    def _fallback_reason(self, status, own_env, own_ids):
        if self.ids != own_ids:
            return "other user"
        if _signal_bits(status["SigIgn"][0], IGNORED_BY_PYTHON) or _signal_bits(status["SigBlk"][0]):
            return "signals ignored or blocked"
        mine = {k: v for k, v in own_env.items() if k not in SHELL_VARS}
        theirs = {k: v for k, v in self.env.items() if k not in SHELL_VARS}
        if mine != theirs:
            return "environment"
        for fd in STDIO:
            try:
                mode = os.stat(f"/proc/{self.pid}/fd/{fd}").st_mode
            except OSError:
                return "closed stdio"
            if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
                return "stdio is a file or socket"  # a reopened file would not share the caller's offset
        if len(self.args) >= 2 and self.args[0] == "-c":
            self.kind, self.source, self.argv = "c", self.args[1], ["-c"] + self.args[2:]
            return ""
        if self.args and not self.args[0].startswith("-"):
            # the interpreter's own absolute form of the name (cwd + "/" + name, not normalised)
            path = self.args[0] if self.args[0].startswith("/") else f"{self.cwd}/{self.args[0]}"
            self.kind, self.argv, self.filename = "file", self.args, path
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block here
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    return "not a plain file"  # a directory runs its __main__: the real interpreter's job
                with open(fd, "rb") as f:
                    self.source = f.read()
            except OSError as exc:  # the interpreter's message and exit status, as the caller named it
                self.kind = "unopenable"
                self.source = f"python3: can't open file {path!r}: [Errno {exc.errno}] {exc.strerror}\n".encode()
                return ""
            if self.source[:2] == b"PK":
                return "a zip archive"
            return ""
        return "options"


def _prlimit(pid, resource_id):
    import resource

    return resource.prlimit(pid, resource_id)


def _limit_ids():
    import resource

    return [getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")]


_LIMITS = _limit_ids()


def _become(call, stdio):
    """Child side, right after the fork: the shim's stdio (opened by the parent), cwd, environment, umask and
    limits."""
    import resource

    os.setsid()
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    for resource_id, limits in call.limits:
        try:
            resource.setrlimit(resource_id, limits)
        except (ValueError, OSError):
            pass  # a limit this process may not raise stays as it was at the fork
    os.umask(call.umask)
    os.chdir(call.cwd)
    os.environ.clear()
    os.environ.update(call.env)


def _run(call):
    """Child side: run the code as the interpreter runs `-c CODE` or `FILE`; never returns."""
    import builtins
    import types

    main = types.ModuleType("__main__")
    main.__dict__.update(__builtins__=builtins, __annotations__={}, __spec__=None)
    if call.kind == "c":
        main.__loader__ = sys.modules["__main__"].__dict__.get("__loader__")
        filename, path0 = "<string>", ""
    else:
        from importlib.machinery import SourceFileLoader

        filename = call.filename
        main.__file__, main.__cached__ = filename, None
        main.__loader__ = SourceFileLoader("__main__", filename)
        path0 = _path0(filename)
    sys.modules["__main__"] = main
    sys.argv = list(call.argv)
    sys.path[0] = path0
    sys.path_importer_cache.clear()
    try:
        exec(compile(call.source, filename, "exec"), main.__dict__)  # noqa: S102 - the sandboxed tool
    except SystemExit as exc:
        _exit(_system_exit_status(exc))
    except BaseException as exc:  # noqa: BLE001 - printed as the interpreter prints an uncaught exception
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        exc = exc.with_traceback(tb)
        sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
        sys.excepthook(type(exc), exc, tb)
        if isinstance(exc, KeyboardInterrupt):
            _exit(1, killed_by=signal.SIGINT)
        _exit(1)
    _exit(0)


def _system_exit_status(exc):
    """The exit status of an uncaught SystemExit, as the interpreter handles it (a non-int code is printed)."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        sys.stderr.write(f"{code}\n")
    except Exception:  # noqa: BLE001 - as the interpreter: the status is 1 either way
        pass
    return 1


def _exit(status, killed_by=None):
    """End the child as the interpreter ends, less the teardown of its modules (most of a fork's CPU, and
    nothing a tool sees): wait for non-daemon threads, run atexit functions, flush stdout (a failure is reported
    as the interpreter reports it, status 120) and stderr."""
    threading = sys.modules.get("threading")
    if threading is not None:
        threading._shutdown()
    import atexit

    atexit._run_exitfuncs()
    stdout, stderr = sys.stdout, sys.stderr
    if stdout is not None and not stdout.closed:
        try:
            stdout.flush()
        except Exception as exc:  # noqa: BLE001 - reported like Py_FinalizeEx's flush_std_files
            sys.unraisablehook(_Unraisable(type(exc), exc, exc.__traceback__, None, stdout))
            status = 120
    if stderr is not None and not stderr.closed:
        try:
            stderr.flush()
        except Exception:  # noqa: BLE001 - as the interpreter: silently, status 120
            status = 120
    if killed_by is not None:
        signal.signal(killed_by, signal.SIG_DFL)
        os.kill(os.getpid(), killed_by)
    os._exit(status)


class _Unraisable:
    def __init__(self, exc_type, exc_value, exc_traceback, err_msg, obj):
        self.exc_type, self.exc_value, self.exc_traceback = exc_type, exc_value, exc_traceback
        self.err_msg, self.object = err_msg, obj


def _path0(filename):
    """sys.path[0] for a script, as the interpreter computes it: one readlink of the name, then its directory."""
    path0 = filename
    try:
        link = os.readlink(filename)
    except OSError:
        link = ""
    if link.startswith("/"):
        path0 = link
    elif "/" in link:
        path0 = filename[:filename.rindex("/") + 1] + link
    cut = path0.rfind("/")
    return path0[:cut] if cut > 0 else path0[:cut + 1]


def _reply(pid, text):
    path = f"{DIR}/r{pid}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        pass  # the shim is gone
    else:
        try:
            os.write(fd, text.encode())
        except OSError:
            pass
        os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        pass


def _start():
    import gc

    for name in sys.argv[1:]:
        __import__(name)
    gc.freeze()  # the children's collections skip (and so do not copy) everything the parent holds
    os.makedirs(DIR, exist_ok=True)
    request = f"{DIR}/req"
    try:
        os.unlink(request)
    except FileNotFoundError:
        pass
    os.mkfifo(request, 0o622)
    req_fd = os.open(request, os.O_RDWR)  # a reader and a writer: never EOF between shims
    for path, text, mode in ((f"{DIR}/pid", f"{os.getpid()}\n", 0o644), (SHIM, SHIM_TEXT, 0o755)):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    return req_fd


class Job:
    """One forked call: the shim that waits for it and the child that runs it, each watched by a pidfd."""

    def __init__(self, shim_pid, shim_fd, child_pid):
        self.shim_pid, self.shim_fd, self.child_pid = shim_pid, shim_fd, child_pid
        self.child_fd = os.pidfd_open(child_pid)


def main():
    own_env = dict(os.environ)
    status = _status_fields(os.getpid())
    own_ids = (tuple(status["Uid"]), tuple(status["Gid"]), tuple(status["Groups"]))
    req_fd = _start()
    poll = select.poll()
    poll.register(req_fd, select.POLLIN)
    by_fd = {}  # a live pidfd -> its job
    pending = b""
    while True:
        for fd, _ in poll.poll():
            if fd == req_fd:
                pending += os.read(req_fd, 4096)
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    try:
                        job = _serve(line, own_env, own_ids)
                    except Exception:  # noqa: BLE001 - this call waits for its tool timeout; the next ones go on
                        continue
                    if job is not None:
                        for pidfd in (job.shim_fd, job.child_fd):
                            by_fd[pidfd] = job
                            poll.register(pidfd, select.POLLIN)
                continue
            job = by_fd.pop(fd)
            poll.unregister(fd)
            os.close(fd)
            if fd == job.shim_fd:  # the caller died (a tool timeout): the call dies with it
                job.shim_fd = None
                try:
                    os.killpg(job.child_pid, signal.SIGKILL)
                except OSError:
                    pass
                continue
            _, code = os.waitpid(job.child_pid, 0)
            if job.shim_fd is not None:
                by_fd.pop(job.shim_fd)
                poll.unregister(job.shim_fd)
                os.close(job.shim_fd)
            _reply(job.shim_pid, f"sig {os.WTERMSIG(code)}\n" if os.WIFSIGNALED(code)
                   else f"exit {os.WEXITSTATUS(code)}\n")


def _serve(line, own_env, own_ids):
    """Answer one request: `fallback`, or fork the child that runs it."""
    try:
        pid = int(line)
    except ValueError:
        return None
    stdio = []
    try:
        shim_fd = os.pidfd_open(pid)
    except OSError:
        return None  # gone already
    try:
        call = Call(pid, own_env, own_ids)
        if not call.reason:
            stdio = [os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY if fd == STDIO[0] else os.O_WRONLY) for fd in STDIO]
    except OSError:
        call = None
    if call is None or call.reason or call.kind == "unopenable":
        answer = "fallback\n"
        if call is not None and not call.reason:
            os.write(stdio[2], call.source)
            answer = "exit 2\n"
        for fd in [shim_fd, *stdio]:
            os.close(fd)
        _reply(pid, answer)
        return None
    child = os.fork()
    if child == 0:
        _become(call, stdio)
        _run(call)
    for fd in stdio:
        os.close(fd)
    return Job(pid, shim_fd, child)


if __name__ == "__main__":
    main()
