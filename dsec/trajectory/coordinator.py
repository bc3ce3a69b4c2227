"""Exactly-once tool calls: the server runs every (trajectory, step) through `StepCoordinator.run_once`.

The order of events is what makes it exactly-once: an intent record is durable before `execute` starts, and
the result record is durable before anyone sees the result. So after any crash a step is in one of three
states: never started (no record: safe to run), finished (result logged: replay it), or started but not
finished (intent only: its effect is unknown, and we say so instead of guessing — StepIndeterminate).
Within one server a retry of a step that is still running waits for it instead of running it again.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from dsec.config import ServerConfig
from dsec.errors import InvalidSpec, RuntimeFailure, StepIndeterminate, TrajectoryDiverged
from dsec.trajectory.filelog import FileLog, LogInUse
from dsec.trajectory.log import StepRef, TrajectoryLog, check_trajectory_id
from dsec.trajectory.records import StepState

log = logging.getLogger("dsec.trajectory")

MAX_FILE_LOGS = 16


def open_log(config: ServerConfig) -> TrajectoryLog:
    """The server's trajectory log: PostgreSQL when `config.trajectory_dsn` is set, else files under home.

    A file log belongs to one process. When another live server on the same home holds it (tests, or two
    embedded servers), this server logs to the next free `trajectories-N` directory instead of failing to
    start; a restarted lone server always gets the primary directory back, so resume finds its records.
    """
    if config.trajectory_dsn:
        from dsec.trajectory.pglog import PostgresLog  # psycopg loads only for a server with a PostgreSQL log

        return PostgresLog(config.trajectory_dsn)
    primary = Path(config.trajectory_dir)
    for index in range(MAX_FILE_LOGS):
        directory = primary if index == 0 else primary.with_name(f"{primary.name}-{index}")
        try:
            return FileLog(directory)
        except LogInUse:
            log.warning("trajectory log %s is held by another server; trying the next one", directory)
    raise RuntimeFailure(
        f"all {MAX_FILE_LOGS} trajectory logs under {primary.parent} are held by other servers; "
        "stop some, or set DSEC_TRAJECTORY_DSN to share a PostgreSQL log"
    )


def _indeterminate(trajectory_id: str, step: int, kind: str, started_at: float, sandbox_id: str) -> StepIndeterminate:
    return StepIndeterminate(
        f"trajectory {trajectory_id!r} step {step} ({kind}) started at "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started_at))} in sandbox {sandbox_id} but its "
        "result was never logged (the server stopped mid-call), so its effect is unknown; inspect the sandbox, "
        "then call Trajectory.rerun_step(step) to run it again, or fork the trajectory before it",
        trajectory_id=trajectory_id,
        step=step,
        sandbox_id=sandbox_id,
    )


def _diverged(trajectory_id: str, step: int, logged: str, requested: str) -> TrajectoryDiverged:
    return TrajectoryDiverged(
        f"trajectory {trajectory_id!r} diverged at step {step}: the log holds request {logged[:16]} but this "
        f"call is {requested[:16]}; resume with the same calls in the same order, or fork the trajectory at "
        f"step {step} under a new id",
        trajectory_id=trajectory_id,
        step=step,
        logged_hash=logged,
        request_hash=requested,
    )


_COORDINATORS: weakref.WeakKeyDictionary[TrajectoryLog, StepCoordinator] = weakref.WeakKeyDictionary()


def coordinator_for(log: TrajectoryLog) -> StepCoordinator:
    """The one coordinator of `log`: services that only hold the log (TrajectoryService) must share its
    in-flight table, or re-running an indeterminate step could race a live execution of it."""
    coordinator = _COORDINATORS.get(log)
    return coordinator if coordinator is not None else StepCoordinator(log)


class StepCoordinator:
    """Runs each logged step at most once and returns its logged result to every retry."""

    def __init__(self, log: TrajectoryLog) -> None:
        self.log = log
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, int], tuple[str, Future]] = {}
        self._rebuild: dict[tuple[str, int], str] = {}  # logged steps to re-execute once, in this sandbox
        self.executions = 0  # how many times `execute` was called: the crash suite checks it
        self.rebuilt = 0  # of those, re-executions that rebuilt a lost sandbox (explicit opt-in)
        _COORDINATORS[log] = self

    def run_once(self, ref: StepRef, execute: Callable[[], bytes], request: bytes = b"") -> tuple[bytes, bool]:
        """Return (result bytes, replayed). `request` (optional) is stored with the intent, for audits."""
        trajectory_id, step, request_hash, sandbox_id = ref.trajectory_id, ref.step, ref.request_hash, ref.sandbox_id
        key = (trajectory_id, step)
        while True:
            with self._lock:
                running = self._inflight.get(key)
            if running is not None:
                running_hash, running_future = running
                if running_hash != request_hash:
                    raise _diverged(trajectory_id, step, running_hash, request_hash)
                return running_future.result(), True
            logged = self.log.lookup(trajectory_id, step)  # outside the lock: other steps go on meanwhile
            if logged is not None and logged.state is not StepState.ABANDONED:
                if logged.request_hash != request_hash:
                    raise _diverged(trajectory_id, step, logged.request_hash, request_hash)
            with self._lock:
                if key in self._inflight:
                    continue  # another call started this step after our check: wait for it instead
                if logged is not None and logged.state is StepState.INTENT:
                    # Stale if a call here finished it since; nothing here runs it now, so re-read once.
                    logged = self.log.lookup(trajectory_id, step)
                    if logged is not None and logged.state is StepState.INTENT:
                        raise _indeterminate(trajectory_id, step, logged.kind, logged.started_at, logged.sandbox_id)
                rebuild = logged is not None and logged.state is StepState.DONE and self._rebuild.get(key) == sandbox_id
                if logged is not None and logged.state is StepState.DONE and not rebuild:
                    assert logged.result is not None
                    return logged.result, True
                if rebuild:
                    del self._rebuild[key]
                future: Future = Future()
                self._inflight[key] = (request_hash, future)
            break
        try:
            if rebuild:
                assert logged is not None and logged.result is not None
                self._reexecute(execute)
                result, replayed = logged.result, True
            else:
                result, replayed = self._execute(ref, execute, request)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(result)
            return result, replayed
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _reexecute(self, execute: Callable[[], bytes]) -> None:
        """Rebuild: redo a logged step's effect in a new sandbox; the caller still gets the logged result."""
        with self._lock:
            self.executions += 1
            self.rebuilt += 1
        execute()

    def rebuild(self, trajectory_id: str, from_step: int, to_step: int, sandbox_id: str) -> int:
        """Opt in to re-executing logged steps [from_step, to_step) in `sandbox_id` as the rollout re-issues them.

        Why opt-in: re-running tool calls is exactly what the log exists to avoid; it is only right when the
        sandbox holding their effects is gone and the caller says the calls are safe to repeat.
        """
        check_trajectory_id(trajectory_id)
        if not sandbox_id or from_step < 0 or to_step < from_step:
            raise InvalidSpec(
                f"trajectory {trajectory_id!r}: rebuild needs a sandbox id and 0 <= from_step <= to_step, "
                f"got {from_step}..{to_step} in {sandbox_id!r}"
            )
        done = {
            r.step for r in self.log.steps(trajectory_id, with_results=False)
            if r.state is StepState.DONE and from_step <= r.step < to_step
        }
        self.log.attach(trajectory_id, sandbox_id)
        with self._lock:
            for step in done:
                self._rebuild[(trajectory_id, step)] = sandbox_id
        return len(done)

    def _execute(self, ref: StepRef, execute: Callable[[], bytes], request: bytes) -> tuple[bytes, bool]:
        trajectory_id, step, request_hash = ref.trajectory_id, ref.step, ref.request_hash
        if not self.log.begin(ref, request):
            # Logged between our lookup and our intent: by a call here that finished meanwhile, or by another
            # server sharing a PostgreSQL log.
            logged = self.log.lookup(trajectory_id, step)
            if logged is not None and logged.request_hash != request_hash:
                raise _diverged(trajectory_id, step, logged.request_hash, request_hash)
            if logged is not None and logged.state is StepState.DONE and logged.result is not None:
                return logged.result, True
            raise StepIndeterminate(
                f"trajectory {trajectory_id!r} step {step} is being executed by another server; retry to get "
                "its result once it is logged",
                trajectory_id=trajectory_id,
                step=step,
            )
        started = time.time()
        with self._lock:
            self.executions += 1
        try:
            result = execute()
        except BaseException as exc:
            # The call failed and its caller is told so: record that, so a retry may run it again.
            self.log.abandon(trajectory_id, step, f"{type(exc).__name__}: {exc}")
            raise
        self.log.complete(ref, result, started, time.time())
        return result, False

    def rerun_step(self, trajectory_id: str, step: int) -> bool:
        """Operator's opt-in for an indeterminate step: let the next call run it again. False if not indeterminate."""
        with self._lock:
            if (trajectory_id, step) in self._inflight:
                return False
            logged = self.log.lookup(trajectory_id, step, with_result=False)
            if logged is None or logged.state is not StepState.INTENT or logged.stored_in != trajectory_id:
                return False
            self.log.abandon(trajectory_id, step, "operator chose to re-run this step")
            return True
