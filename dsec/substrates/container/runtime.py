"""Drive an OCI runtime binary (crun or runc) through its command line.

Each driver keeps the runtime's state under its own `--root` below DSEC_HOME, so crash cleanup finds exactly the
containers dsec started and nothing else on the host.

crun 1.8 refuses this host's hybrid cgroup layout ("cgroups in hybrid mode not supported") because a cgroup2
hierarchy is mounted at /sys/fs/cgroup/unified (holding no controllers dsec uses). Every crun command therefore
runs through `dsec-v1view` (v1view.c): a private mount namespace in which that one mount is gone, so crun sees
plain cgroup v1; the namespace lives only as long as the crun command and the host's mounts are untouched.
It costs ~1.3 ms per call against ~7 ms for `unshare -m sh -c 'umount …; exec crun …'`. runc works as-is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dsec import procwait
from dsec.errors import RuntimeFailure
from dsec.substrates.container.sealed import sealed_fd
from dsec.substrates.container.v1view import v1view_binary

RUNTIMES = ("crun", "runc")
HYBRID_CGROUP2 = Path("/sys/fs/cgroup/unified")
COMMAND_TIMEOUT_S = 60.0
CRIU_TIMEOUT_S = 300.0  # a checkpoint writes the sandbox's whole memory
# open TCP connections (the netns stays, so they can be restored) and file locks are checkpointed too
CRIU_FLAGS = ("--tcp-established", "--file-locks")


def _criu_errors(log: Path) -> str:
    """The Error lines of a CRIU log: what a failed checkpoint or restore reports."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line.strip() for line in lines if "Error" in line]
    return f"(criu: {'; '.join(errors[-4:])[-1000:]})" if errors else ""


def runtime_binary(name: str) -> str | None:
    """The binary of runtime `name`: `$DSEC_CRUN` / `$DSEC_RUNC` when set (a build under test, before it goes on
    PATH), else the first on PATH (setup's /usr/local/bin/crun, built with CRIU, precedes Debian's /usr/bin/crun)."""
    return os.environ.get(f"DSEC_{name.upper()}") or shutil.which(name)


def _needs_v1_view(name: str) -> bool:
    """crun on a hybrid host: a cgroup2 mount next to the v1 controllers."""
    return name == "crun" and HYBRID_CGROUP2.is_mount()


@dataclass(frozen=True)
class OciRuntime:
    """One runtime binary with its private state root; `bin_dir` holds dsec's compiled helpers."""

    name: str
    root: Path
    bin_dir: Path

    def __post_init__(self) -> None:
        if self.name not in RUNTIMES:
            raise RuntimeFailure(f"unknown OCI runtime {self.name!r}: choose one of {', '.join(RUNTIMES)}")

    def binary(self) -> str | None:
        return runtime_binary(self.name)

    def _argv(self, *args: str) -> tuple[list[str], tuple[int, ...]]:
        """The command line, and the fds it needs passed: crun runs from its sealed copy (sealed.py)."""
        binary = self.binary()
        if binary is None:
            raise RuntimeFailure(f"{self.name} is not installed: run infra/setup.sh (it installs crun and runc)")
        fds: tuple[int, ...] = ()
        if self.name == "crun" and (fd := sealed_fd(binary)) is not None:
            binary, fds = f"/proc/self/fd/{fd}", (fd,)  # the fd number is the same in the child
        argv = [binary, "--root", str(self.root), *args]
        if _needs_v1_view(self.name):
            argv = [str(v1view_binary(self.bin_dir)), str(HYBRID_CGROUP2), *argv]
        return argv, fds

    def _call(self, *args: str, sandbox_id: str, stdout: object = subprocess.PIPE, check: bool = True,
              timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        argv, fds = self._argv(*args)
        try:
            proc = procwait.run(  # wakes at the runtime's exit: subprocess.run polls with up to 50 ms sleeps
                argv,
                stdout=stdout,
                stderr=subprocess.PIPE if stdout is subprocess.PIPE else subprocess.STDOUT,
                timeout=timeout,
                pass_fds=fds,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeFailure(
                f"{self.name} {args[0]} of sandbox {sandbox_id} did not finish within {timeout:.0f}s: the host is "
                "overloaded or the runtime hung; destroy the sandbox",
                sandbox_id=sandbox_id,
            ) from exc
        if check and proc.returncode != 0:
            raise RuntimeFailure(
                f"{self.name} {args[0]} of sandbox {sandbox_id} failed (exit {proc.returncode}): "
                f"{(proc.stderr or b'').decode(errors='replace').strip()[-2000:]}",
                sandbox_id=sandbox_id,
            )
        return proc

    def run(self, container_id: str, bundle: Path, pid_file: Path, log: Path) -> None:
        """Start the container detached. PID 1's stdio is /dev/null and the runtime's own errors go to `log`
        (`--log`), because CRIU cannot checkpoint a process holding a host file outside its mount namespace."""
        self._start("run", ("run", "--detach", "--bundle", str(bundle), "--pid-file", str(pid_file), container_id), log)

    def _criu_option(self, criu: str) -> tuple[str, ...]:
        """runc takes the CRIU binary to run; crun has no such option: its libcriu starts `criu` from PATH, which
        is the same binary (criu.py finds it there too)."""
        return ("--criu", criu) if self.name == "runc" else ()

    def restore(self, container_id: str, bundle: Path, image_dir: Path, pid_file: Path, log: Path, criu: str) -> None:
        """Bring a checkpointed container back from `image_dir`, detached, like `run`."""
        args = (*self._criu_option(criu), "restore", "--detach", "--bundle", str(bundle),
                "--image-path", str(image_dir),
                "--work-path", str(image_dir), "--pid-file", str(pid_file), *CRIU_FLAGS, container_id)
        self._start("restore", args, log, criu_log=image_dir / "restore.log")

    def checkpoint(self, container_id: str, image_dir: Path, criu: str, leave_running: bool = False) -> None:
        """Save the container's processes and memory into `image_dir` through CRIU; the container
        is gone afterwards unless `leave_running` (a fork's source; a frozen container stays frozen). Its log
        (`dump.log`) stays in `image_dir` and is quoted on failure."""
        keep = ("--leave-running",) if leave_running else ()
        proc = self._call(*self._criu_option(criu), "checkpoint", "--image-path", str(image_dir),
                          "--work-path", str(image_dir),
                          *keep, *CRIU_FLAGS, container_id, sandbox_id=container_id, check=False, timeout=CRIU_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeFailure(
                f"{self.name} checkpoint of sandbox {container_id} failed: {proc.stderr.decode(errors='replace')[-500:]}"
                f" {_criu_errors(image_dir / 'dump.log')}",
                sandbox_id=container_id,
            )

    def _start(self, what: str, args: tuple[str, ...], log: Path, criu_log: Path | None = None) -> None:
        """`run` or `restore`, detached; a failure quotes the log (and CRIU's errors for a restore)."""
        container_id = args[-1]
        proc = self._call("--log", str(log), *args, sandbox_id=container_id, stdout=subprocess.DEVNULL,
                          check=False, timeout=COMMAND_TIMEOUT_S if criu_log is None else CRIU_TIMEOUT_S)
        if proc.returncode != 0:
            tail = log.read_bytes()[-2000:].decode(errors="replace").strip() if log.exists() else ""
            criu = f" {_criu_errors(criu_log)}" if criu_log is not None else ""
            raise RuntimeFailure(
                f"{self.name} {what} of sandbox {container_id} failed (exit {proc.returncode}): {tail}{criu}",
                sandbox_id=container_id,
            )

    def delete(self, container_id: str) -> None:
        """Force-delete the container (kills what is left); a container already gone is fine."""
        proc = self._call("delete", "--force", container_id, sandbox_id=container_id, check=False)
        if proc.returncode != 0 and self.exists(container_id):
            raise RuntimeFailure(
                f"{self.name} delete of sandbox {container_id} failed: {proc.stderr.decode(errors='replace').strip()}",
                sandbox_id=container_id,
            )

    def pause(self, container_id: str) -> None:
        self._call("pause", container_id, sandbox_id=container_id)

    def resume(self, container_id: str) -> None:
        self._call("resume", container_id, sandbox_id=container_id)

    def state(self, container_id: str) -> dict | None:
        """The runtime's state of the container, None when it does not know it."""
        proc = self._call("state", container_id, sandbox_id=container_id, check=False)
        if proc.returncode != 0:
            return None
        return json.loads(proc.stdout)

    def exists(self, container_id: str) -> bool:
        return (self.root / container_id).exists() or self.state(container_id) is not None

    def list(self) -> list[str]:
        """Ids of every container this runtime knows under our root."""
        if not self.root.exists():
            return []
        proc = self._call("list", "--format", "json", sandbox_id="*")
        return [item["id"] for item in json.loads(proc.stdout or b"[]") or []]
