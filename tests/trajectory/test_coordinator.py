"""StepCoordinator: replay, divergence, waiting for an in-flight step, indeterminate steps after a crash."""

from __future__ import annotations

import threading

import pytest

from dsec.errors import StepIndeterminate, TrajectoryDiverged
from dsec.trajectory.coordinator import StepCoordinator
from dsec.trajectory.log import StepRef
from dsec.trajectory.log import TrajectoryLog

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def coordinator(log: TrajectoryLog) -> StepCoordinator:
    return StepCoordinator(log)


def test_same_key_replays_without_executing(coordinator: StepCoordinator) -> None:
    calls: list[int] = []

    def execute() -> bytes:
        calls.append(1)
        return b"result"

    assert coordinator.run_once(StepRef("t", 0, "h", "exec", "sb"), execute) == (b"result", False)
    assert coordinator.run_once(StepRef("t", 0, "h", "exec", "sb"), execute) == (b"result", True)
    assert len(calls) == 1 and coordinator.executions == 1


def test_different_hash_diverges(coordinator: StepCoordinator) -> None:
    coordinator.run_once(StepRef("t", 3, "aaaa", "exec", "sb"), lambda: b"r")
    with pytest.raises(TrajectoryDiverged) as caught:
        coordinator.run_once(StepRef("t", 3, "bbbb", "exec", "sb"), lambda: b"never")
    message = str(caught.value)
    assert "'t'" in message and "step 3" in message and "aaaa" in message and "bbbb" in message


def test_retry_of_a_running_step_waits_for_its_result(coordinator: StepCoordinator) -> None:
    started, release = threading.Event(), threading.Event()
    runs: list[int] = []

    def slow() -> bytes:
        runs.append(1)
        started.set()
        release.wait(30)
        return b"slow result"

    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(r=coordinator.run_once(StepRef("t", 0, "h", "exec", "sb"), slow)))
    thread.start()
    assert started.wait(30)
    retry: dict = {}
    waiter = threading.Thread(target=lambda: retry.update(r=coordinator.run_once(StepRef("t", 0, "h", "exec", "sb"), slow)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive(), "the retry must wait, not run the step again"
    release.set()
    thread.join(30)
    waiter.join(30)
    assert first["r"] == (b"slow result", False)
    assert retry["r"] == (b"slow result", True)
    assert len(runs) == 1


def test_failed_execution_may_run_again(coordinator: StepCoordinator) -> None:
    def boom() -> bytes:
        raise OSError("sandbox vanished")

    with pytest.raises(OSError):
        coordinator.run_once(StepRef("t", 0, "h", "exec", "sb"), boom)
    assert coordinator.run_once(StepRef("t", 0, "h", "exec", "sb"), lambda: b"ok") == (b"ok", False)


def test_intent_without_result_after_crash_is_indeterminate(log: TrajectoryLog, reopen) -> None:
    assert log.begin(StepRef("t", 0, "h", "exec", "sb-7"))  # the server died right after this
    with reopen(log) as log:
        coordinator = StepCoordinator(log)
        with pytest.raises(StepIndeterminate, match="sb-7") as caught:
            coordinator.run_once(StepRef("t", 0, "h", "exec", "sb-7"), lambda: b"must not run")
        assert caught.value.details["step"] == 0
        assert coordinator.executions == 0
        assert coordinator.rerun_step("t", 0)  # the operator's explicit opt-in
        assert coordinator.run_once(StepRef("t", 0, "h", "exec", "sb-7"), lambda: b"ran") == (b"ran", False)
        assert not coordinator.rerun_step("t", 0)  # a finished step is never re-run


def test_fork_replays_parent_prefix(coordinator: StepCoordinator) -> None:
    for step in range(3):
        coordinator.run_once(StepRef("p", step, f"h{step}", "exec", "sb"), lambda s=step: b"p%d" % s)
    coordinator.log.fork("p", 2, "p/sample-1")
    assert coordinator.run_once(StepRef("p/sample-1", 1, "h1", "exec", "sb"), lambda: b"x") == (b"p1", True)
    assert coordinator.run_once(StepRef("p/sample-1", 2, "other", "exec", "sb"), lambda: b"own") == (b"own", False)
    assert coordinator.run_once(StepRef("p", 2, "h2", "exec", "sb"), lambda: b"x") == (b"p2", True)


def test_concurrent_retries_execute_once(coordinator: StepCoordinator) -> None:
    runs: list[int] = []
    results: list[tuple[bytes, bool]] = []

    def execute() -> bytes:
        runs.append(1)
        return b"once"

    def call() -> None:
        results.append(coordinator.run_once(StepRef("t", 0, "h", "exec", "sb"), execute))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(runs) == 1
    assert sorted(results) == [(b"once", False)] + [(b"once", True)] * 7


def test_rebuild_reexecutes_once_in_the_new_sandbox(coordinator: StepCoordinator) -> None:
    for step in range(3):
        coordinator.run_once(StepRef("t", step, f"h{step}", "exec", "old"), lambda s=step: b"r%d" % s)
    assert coordinator.rebuild("t", 1, 3, "new") == 2
    runs: list[int] = []

    def effect() -> bytes:
        runs.append(1)
        return b"fresh output"

    assert coordinator.run_once(StepRef("t", 0, "h0", "exec", "new"), effect) == (b"r0", True)  # before the window
    assert coordinator.run_once(StepRef("t", 1, "h1", "exec", "new"), effect) == (b"r1", True)  # re-executed, logged result
    assert coordinator.run_once(StepRef("t", 1, "h1", "exec", "new"), effect) == (b"r1", True)  # a retry does not redo it
    assert coordinator.run_once(StepRef("t", 2, "h2", "exec", "new"), effect) == (b"r2", True)
    assert len(runs) == 2 and coordinator.rebuilt == 2
    assert coordinator.log.info("t").sandbox_id == "new"


def test_second_server_cannot_claim_a_running_step(log: TrajectoryLog) -> None:
    """Two servers on one shared log: the intent row is the claim, the loser reports instead of running."""
    first, second = StepCoordinator(log), StepCoordinator(log)
    assert log.begin(StepRef("t", 0, "h", "exec", "sb"))  # the first server's intent; it is still executing
    with pytest.raises(StepIndeterminate):
        second.run_once(StepRef("t", 0, "h", "exec", "sb"), lambda: b"must not run")
    log.complete(StepRef("t", 0, "h", "exec", "sb"), b"first", 1.0, 2.0)
    assert second.run_once(StepRef("t", 0, "h", "exec", "sb"), lambda: b"x") == (b"first", True)
    assert first.executions == second.executions == 0
