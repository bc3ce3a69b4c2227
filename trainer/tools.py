"""Tool execution for one rollout, through the dsec SDK, inside that rollout's dsec trajectory.

Why one small module: every effect a rollout has on the world goes through here, so every call is numbered in
the rollout's trajectory (`run/step/prompt/sample`). A resumed rollout re-issues the same calls and gets the
logged results back (`replayed`), so an interrupted training step re-executes no tool call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import dsec
from dsec.errors import DsecError, SandboxExpired, SandboxNotFound, SandboxStateError
from dsec.sdk.trajectory import Trajectory

from trainer.encoding import ToolCall

MAX_RESULT_CHARS = 160  # tool output the policy sees; keeps tiny-model contexts short


def run_python_in_function(code: str) -> str:
    """Runs inside a function sandbox: execute `code`, return what it printed (or the error's last line)."""
    import contextlib
    import io

    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            exec(code, {"__name__": "__main__"})  # noqa: S102 - this is the sandboxed tool
    except Exception as exc:  # noqa: BLE001 - the policy sees the error, like a traceback's last line
        return buffer.getvalue() + f"{type(exc).__name__}: {exc}"
    return buffer.getvalue()


class SandboxLost(Exception):
    """The rollout's sandbox is gone (destroyed, expired, lost with its node) or could not be created: not a tool
    result the policy should see, but a reason to retry the rollout in a fresh sandbox.

    `stop_reason`: "timeout" when the sandbox ran past its lifetime, else "sandbox_lost".
    """

    def __init__(self, trajectory_id: str, cause: Exception) -> None:
        super().__init__(f"trajectory {trajectory_id!r}: sandbox lost: {type(cause).__name__}: {cause}")
        expired = isinstance(cause, SandboxExpired) and cause.reason == "timeout"
        self.stop_reason = "timeout" if expired else "sandbox_lost"


def lost(exc: BaseException) -> bool:
    """Whether a dsec error means the sandbox itself is gone (rather than one call failing)."""
    return isinstance(exc, (SandboxNotFound, SandboxStateError))


@dataclass
class ToolStats:
    live: int = 0
    replayed: int = 0
    errors: int = 0


@dataclass
class ToolBox:
    """One rollout's sandbox and trajectory. Create with `open_toolbox`; `close()` destroys the sandbox."""

    trajectory: Trajectory
    sandbox: dsec.Sandbox
    substrate: str
    timeout_s: float
    stats: ToolStats = field(default_factory=ToolStats)
    after_step: Callable[[ToolBox], None] | None = None  # runs after each logged call (a test's protocol point)
    # a lost sandbox raises SandboxLost from `execute` (the rollout loop retries it) instead of becoming a
    # result text the policy reads; off for harnesses that have no retry of their own
    raise_lost: bool = False

    def _count(self, replayed: bool) -> None:
        if replayed:
            self.stats.replayed += 1
        else:
            self.stats.live += 1
        self._stepped()

    def _stepped(self) -> None:
        if self.after_step is not None:
            self.after_step(self)

    def shell(self, command: str) -> dsec.ExecResult:
        with self.trajectory:
            result = self.sandbox.exec(command, timeout=self.timeout_s, cwd="/work")
        self._count(result.replayed)
        return result

    def write_file(self, path: str, content: str) -> None:
        with self.trajectory:
            self.sandbox.files.write(path, content)
        self.stats.live += 1  # writes report no replay flag; counted server-side in the trajectory log
        self._stepped()

    def run_python(self, code: str) -> str:
        if self.substrate == "function":
            with self.trajectory:
                out = self.sandbox.call_with_options(run_python_in_function, (code,), timeout=self.timeout_s)
            self.stats.live += 1
            self._stepped()
            return out
        result = self.shell_argv(["python3", "-c", code])
        text = (result.stdout + result.stderr).decode(errors="replace")
        return text + ("\n[timed out]" if result.timed_out else "")

    def shell_argv(self, argv: list[str]) -> dsec.ExecResult:
        with self.trajectory:
            result = self.sandbox.exec(argv, timeout=self.timeout_s)
        self._count(result.replayed)
        return result

    def check_equal(self, answer: str, expr: str) -> bool:
        """Verifier for arithmetic: the sandbox evaluates `expr` and compares with the answer text."""
        code = f"import sys\nsys.stdout.write('1' if {answer!r} == str({expr}) else '0')"
        return self.run_python(code).strip() == "1"

    def execute(self, call: ToolCall) -> str:
        """Run one parsed call; any failure (unknown tool, bad arguments, sandbox error) is a result text."""
        try:
            text = self._dispatch(call)
        except DsecError as exc:
            if self.raise_lost and lost(exc):
                raise SandboxLost(self.trajectory.id, exc) from exc
            self.stats.errors += 1
            text = f"error: {type(exc).__name__}: {exc}"
        except (TypeError, ValueError, KeyError) as exc:
            self.stats.errors += 1
            text = f"error: {exc}"
        return text[:MAX_RESULT_CHARS]

    def _dispatch(self, call: ToolCall) -> str:
        args = call.arguments
        if call.name == "run_python":
            return self.run_python(_str_arg(args, "code"))
        if call.name == "write_file":
            self.write_file(_str_arg(args, "path"), _str_arg(args, "content"))
            return "ok"
        if call.name == "run_shell":
            result = self.shell(_str_arg(args, "command"))
            out = (result.stdout + result.stderr).decode(errors="replace")
            return f"exit {result.exit_code}" + (f"\n{out}" if out else "")
        raise ValueError(f"unknown tool {call.name!r}")

    def close(self) -> None:
        try:
            self.sandbox.destroy()
        except DsecError:
            pass  # already gone (timeout reaper or server restart): nothing left to free


def _str_arg(args: dict[str, object], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str):
        raise ValueError(f"tool argument {name!r} must be a string, got {type(value).__name__}")
    return value


def open_toolbox(
    client: dsec.Client,
    trajectory_id: str,
    *,
    image: str,
    substrate: str,
    timeout_s: float,
    sandbox_timeout_s: float,
    rebuild: bool = False,
) -> ToolBox:
    """The rollout's sandbox: re-attached by the trajectory when it is still live (resume), else a new one.

    `rebuild`: a retry after the sandbox was lost: a new sandbox in which the logged steps re-execute as the
    rollout re-issues them (their results still come from the log)."""
    trajectory = Trajectory(trajectory_id, client)
    labels = {"dsec-trainer": "rollout"}
    sandbox = trajectory.sandbox(
        lambda: client.create(image=image, substrate=substrate, timeout_s=sandbox_timeout_s, labels=labels),
        rebuild=rebuild,
    )
    return ToolBox(trajectory=trajectory, sandbox=sandbox, substrate=substrate, timeout_s=timeout_s)
