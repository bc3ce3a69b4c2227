"""The rollout loop's sandbox work: one lane per rollout, run on a few threads while the loop keeps sampling.

Why lanes: a rollout's sandbox tasks (set-up, each turn's tool calls, its verifier, its destroy) must run in
order, so its trajectory's steps are issued one at a time and a resumed or retried rollout replays them, but
nothing orders them against the sampler or against other rollouts. The loop hands a rollout's calls over as soon
as the sampler has finished that row and goes on sampling the others; it blocks only where it must (`wait`),
and that blocked time is what `BatchStats.sandbox_wait_s` counts. Threads suffice: every task waits on the dsec
server (other processes), and the sampler's thread keeps the GIL only between torch calls.

Why two priorities: the loop's next turn waits for the set-ups and tool calls of the rollouts that go on, but
only the batch's end waits for a finished rollout's verifier and destroy. Running the urgent tasks first keeps
the verifiers (CPU work in the sandboxes, on the same cores) from delaying the next turn; they run while it is
sampled instead.
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass, field

URGENT, LATER = 0, 1  # task priorities: what the next turn waits for, what only the batch's end waits for


@dataclass
class BatchStats:
    """What one `run_rollouts` call spent on its calling thread. Kept apart from the rollouts because concurrent
    sandbox work makes the per-rollout `sandbox_s` add up to more than the loop's own wait."""

    # Wall seconds the loop's thread was blocked on sandbox work with nothing it may sample: at each turn's end
    # until the tool results of every rollout that goes on are back, at the batch's end until every verifier
    # (and destroy) has returned, while lost sandboxes are destroyed before a retry, and the whole of every
    # sandbox task it runs itself (sandbox_concurrency 1). Sandbox work done while the loop samples is not counted.
    sandbox_wait_s: float = 0.0


@dataclass(eq=False)
class _Task:
    run: Callable[[], None]
    priority: int
    future: Future[None] = field(default_factory=Future)


@dataclass(eq=False)
class _Lane:
    queue: deque[_Task] = field(default_factory=deque)  # submitted, not yet ended; the head is queued or running
    last: Future[None] | None = None
    error: BaseException | None = None  # a task failed: the lane's later tasks fail with it, unrun


class SandboxLanes:
    """Runs each lane's tasks in order, different lanes' tasks on up to `workers` threads, urgent ones first.

    With one worker there are no threads: a task runs at once on the calling thread (the loop's order before the
    lanes existed), and all of its time counts as waiting."""

    def __init__(self, workers: int, stats: BatchStats) -> None:
        self.stats = stats
        self._workers = workers if workers > 1 else 0
        self._threads: list[threading.Thread] = []
        self._cond = threading.Condition()
        self._ready: list[tuple[int, int, _Lane, _Task]] = []  # heap of lane heads: (priority, order, lane, task)
        self._order = itertools.count()
        self._lanes: dict[int, _Lane] = {}
        self._owners: list[object] = []  # keeps every lane's owner alive, so no id() is reused in the batch
        self._tasks: list[Future[None]] = []
        self._closed = False

    def submit(self, owner: object, task: Callable[[], None], priority: int = URGENT) -> None:
        """Queue `task()` behind `owner`'s earlier tasks. It runs in a copy of the caller's context (a dsec
        trajectory context entered by one rollout never leaks into another's calls); if an earlier task of the
        lane failed, it fails with the same exception instead of running."""
        if not self._workers:
            started = time.perf_counter()
            try:
                task()
            finally:
                self.stats.sandbox_wait_s += time.perf_counter() - started
            return
        item = _Task(_in_context(task), priority)
        with self._cond:
            lane = self._lanes.get(id(owner))
            if lane is None:
                lane = self._lanes[id(owner)] = _Lane()
                self._owners.append(owner)
            lane.queue.append(item)
            lane.last = item.future
            self._tasks.append(item.future)
            if len(lane.queue) == 1:
                self._push(lane, item)
            if len(self._threads) < self._workers:
                thread = threading.Thread(target=self._work, name=f"rollout-sandbox-{len(self._threads)}",
                                          daemon=True)
                self._threads.append(thread)
                thread.start()

    def wait(self, owners: Iterable[object]) -> None:
        """Block until the lanes of `owners` are idle. The first exception (in the order given) is raised after
        the tasks already running have ended, and tasks not yet started are not run."""
        with self._cond:
            lasts = [lane.last for o in owners if (lane := self._lanes.get(id(o))) and lane.last is not None]
        if not lasts:
            return
        started = time.perf_counter()
        try:
            wait(lasts, return_when=FIRST_EXCEPTION)
            failed = [f for f in lasts if f.done() and not f.cancelled() and f.exception() is not None]
            if failed:
                self.abort()
                raise failed[0].exception()  # type: ignore[misc]
        finally:
            self.stats.sandbox_wait_s += time.perf_counter() - started

    def abort(self) -> None:
        """Cancel the tasks not yet started and wait for the running ones (before a failed batch's sandboxes are
        destroyed)."""
        with self._cond:
            tasks = list(self._tasks)
        for f in tasks:
            f.cancel()
        wait(tasks)

    def close(self) -> None:
        """Cancel what has not started, let the running tasks end, and stop the threads."""
        with self._cond:
            self._closed = True
            tasks = list(self._tasks)
            self._cond.notify_all()
        for f in tasks:
            f.cancel()
        for thread in self._threads:
            thread.join()

    def _push(self, lane: _Lane, task: _Task) -> None:
        heapq.heappush(self._ready, (task.priority, next(self._order), lane, task))
        self._cond.notify()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._closed:
                    self._cond.wait()
                if not self._ready:
                    return
                _, _, lane, task = heapq.heappop(self._ready)
                error = lane.error
            if task.future.set_running_or_notify_cancel():
                if error is not None:
                    task.future.set_exception(error)
                else:
                    try:
                        task.run()
                    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the lane
                        error = exc
                        task.future.set_exception(exc)
                    else:
                        task.future.set_result(None)
            with self._cond:
                lane.error = lane.error or error
                lane.queue.popleft()
                if lane.queue:
                    self._push(lane, lane.queue[0])


def _in_context(task: Callable[[], None]) -> Callable[[], None]:
    """`task` bound to a copy of the current context (taken now, on the submitting thread)."""
    context = contextvars.copy_context()
    return lambda: context.run(task)
