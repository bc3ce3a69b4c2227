"""Readiness: run a sandbox's start command as a long-lived process and wait until its probe passes.

Why in create: a sandbox whose service is still starting is not usable, and every caller would otherwise
write its own retry loop (Modal's lesson: started is not ready). The start command runs in the sandbox's
ProcessTable (tag `dsec-start`: listed, attachable and killed on destroy like any ProcessService process).
The probe is tried every `interval_s` until `timeout_s` has passed — that is what a readiness probe is; the
wait between tries ends early when the start command exits, so a crashing service fails the create at once
instead of at the deadline.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from dsec.errors import (
    CommandNotFound,
    DsecError,
    PermissionDeniedInSandbox,
    PortUnreachable,
    SandboxNotReady,
)
from dsec.models import ReadyProbe
from dsec.server.execution import run_process
from dsec.server.port_ends import open_end
from dsec.server.processes import Chunk, Ended, Subscription

if TYPE_CHECKING:
    from dsec.server.manager import ManagedSandbox

START_TAG = "dsec-start"
TAIL_BYTES = 2000  # how much of the start command's and the probe's output an error carries


def _tail(data: bytes) -> str:
    return data[-TAIL_BYTES:].decode(errors="replace").strip() or "(none)"


class _StartOutput:
    """The start command's output so far (its tail) and its end, read without blocking the probe loop."""

    def __init__(self, subscription: Subscription | None) -> None:
        self.subscription = subscription
        self.output = b""
        self.ended: Ended | None = None

    def wait(self, seconds: float) -> None:
        """Read what the start command printed for up to `seconds`; returns early if it ends."""
        if self.subscription is None or self.ended is not None:
            time.sleep(max(seconds, 0.0))  # nothing to wait on: this is the probe's interval
            return
        until = time.monotonic() + max(seconds, 0.0)
        while self.ended is None:
            event = self.subscription.get(timeout=max(until - time.monotonic(), 0.0))
            if event is None:
                return
            if isinstance(event, Chunk):
                self.output = (self.output + event.data)[-TAIL_BYTES:]
            elif isinstance(event, Ended):
                self.ended = event

    def close(self) -> None:
        if self.subscription is not None:
            self.subscription.close()  # detach only: the service runs on


def start_service(sandbox: ManagedSandbox, argv: list[str]) -> Subscription:
    """Start `argv` in the sandbox as its long-lived service process; the subscription sees all its output."""
    env, cwd = sandbox.default_env(), sandbox.default_cwd()
    return sandbox.processes.start(lambda: sandbox.handle.spawn(argv, env, cwd), argv, {}, cwd, START_TAG,
                                   pty=False, stdin=False)


def _probe_once(sandbox: ManagedSandbox, probe: ReadyProbe, remaining_s: float) -> tuple[bool, str]:
    """One try: (passed, what it said)."""
    if probe.tcp_port:
        try:
            end = open_end(sandbox.handle, probe.tcp_port, sandbox.sandbox_id)
        except PortUnreachable as exc:
            return False, exc.message
        end.close()
        return True, ""
    try:
        process = sandbox.handle.spawn(list(probe.command), sandbox.default_env(), sandbox.default_cwd())
    except (CommandNotFound, PermissionDeniedInSandbox) as exc:
        raise SandboxNotReady(f"the readiness probe of sandbox {sandbox.sandbox_id} cannot run: {exc.message}",
                              sandbox_id=sandbox.sandbox_id) from None
    output, status = b"", None
    for event in run_process(sandbox.handle, process, stdin=None, timeout_s=max(remaining_s, 0.1),
                             max_output_bytes=TAIL_BYTES, oom_kills_before=-1):
        if event.HasField("status"):
            status = event.status
        else:
            output += event.stdout + event.stderr
    passed = status is not None and status.exit_code == 0 and not status.timed_out
    said = _tail(output) + ("" if status is None else f" (exit code {status.exit_code}{', timed out' if status.timed_out else ''})")
    return passed, said


def make_ready(sandbox: ManagedSandbox, start: list[str], probe: ReadyProbe | None) -> None:
    """Run `start` (if any) and return once `probe` (if any) passes; SandboxNotReady otherwise. The caller
    destroys the sandbox on failure. Records `ready` in the sandbox's create timings."""
    began = time.monotonic()
    output = _StartOutput(start_service(sandbox, start) if start else None)
    try:
        if probe is not None:
            _wait_probe(sandbox, probe, output, began)
    finally:
        output.close()
    ready_ms = (time.monotonic() - began) * 1000
    sandbox.timings_ms["ready"] = ready_ms
    sandbox.timings_ms["total"] = sandbox.timings_ms.get("total", 0.0) + ready_ms
    sandbox.events.add("sandbox ready", start=" ".join(start), ready_ms=round(ready_ms))


def _wait_probe(sandbox: ManagedSandbox, probe: ReadyProbe, output: _StartOutput, began: float) -> None:
    deadline = began + probe.timeout_s
    said, tries = "", 0
    while True:
        tries += 1
        try:
            passed, said = _probe_once(sandbox, probe, deadline - time.monotonic())
        except SandboxNotReady:
            raise
        except DsecError as exc:  # the sandbox itself failed under the probe (dead agent, unsupported port relay)
            raise SandboxNotReady(f"the readiness probe of sandbox {sandbox.sandbox_id} failed: "
                                  f"{type(exc).__name__}: {exc.message}", sandbox_id=sandbox.sandbox_id) from None
        if passed:
            return
        if output.ended is not None and output.ended.exit_code != 0:
            raise SandboxNotReady(
                f"the start command of sandbox {sandbox.sandbox_id} ended ({output.ended.status}) before its "
                f"readiness probe passed; its output: {_tail(output.output)}; last probe: {said}",
                sandbox_id=sandbox.sandbox_id,
            )
        if time.monotonic() >= deadline:
            raise SandboxNotReady(
                f"sandbox {sandbox.sandbox_id} was not ready within {probe.timeout_s:g}s ({tries} probes); "
                f"last probe: {said}; start command output: {_tail(output.output)}",
                sandbox_id=sandbox.sandbox_id,
            )
        output.wait(min(probe.interval_s, deadline - time.monotonic()))
