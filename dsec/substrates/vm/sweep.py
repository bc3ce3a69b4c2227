"""What VM sandboxes leave on a host beyond their network plumbing: QEMU processes, found by their pidfile.

Every QEMU dsec starts runs with `-pidfile <state dir>/qemu.pid`, so its command line names the sandbox's state
directory (and id): the orphan sweep (dsec/server/orphans.py) judges the owner, this module kills the process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from dsec.substrates.registry import SweepContext, Sweeper
from dsec.substrates.vm.machine import PID_FILE
KILL_WAIT_S = 10.0


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)


class QemuProcesses(Sweeper):
    stage = 0
    kinds = ("qemus",)

    def sweep(self, ctx: SweepContext) -> None:
        for pid, state_dir in self._qemus().items():
            if ctx.gone(state_dir.name, state_dir):
                ctx.remove(state_dir.name, "qemus", pid, lambda p=pid: _kill(p))

    @staticmethod
    def _qemus() -> dict[int, Path]:
        """QEMU pid -> its state directory (from `-pidfile <dir>/qemu.pid`)."""
        found: dict[int, Path] = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not argv or b"qemu-system" not in argv[0]:
                continue
            for flag, value in zip(argv, argv[1:]):
                if flag == b"-pidfile" and value.endswith(f"/{PID_FILE}".encode()):
                    found[int(proc.name)] = Path(value.decode(errors="replace")).parent
        return found


QEMU = QemuProcesses()
