"""What every trajectory log backend offers (embedded file log, PostgreSQL), and the rules they share.

The coordinator and the TrajectoryService only talk to this interface, so the exactly-once logic is written
once and tested against both backends. Fork resolution and retention live here too: they are the same
whatever stores the records.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from dsec.errors import InvalidSpec
from dsec.trajectory.records import StepState

MAX_TRAJECTORY_ID = 512


def check_trajectory_id(trajectory_id: str) -> str:
    """Reject ids that cannot be logged, before anything is written."""
    if not trajectory_id or len(trajectory_id) > MAX_TRAJECTORY_ID or "\0" in trajectory_id:
        raise InvalidSpec(
            f"invalid trajectory id {trajectory_id[:64]!r}: use 1..{MAX_TRAJECTORY_ID} characters without NUL, "
            "e.g. 'run-7/prompt-42/sample-3'"
        )
    return trajectory_id


def check_step(trajectory_id: str, step: int) -> int:
    if step < 0:
        raise InvalidSpec(f"trajectory {trajectory_id!r}: step must be >= 0, got {step}")
    return step


@dataclass(frozen=True, slots=True)
class StepRef:
    """Which call a logged step is: its place (trajectory, step), what it asks (the request's hash, compared on
    replay to catch a diverged rollout), what kind of call it is and the sandbox it runs in. One value, checked
    once when made, instead of five positional arguments every backend and the coordinator had to agree on."""

    trajectory_id: str
    step: int
    request_hash: str
    kind: str
    sandbox_id: str

    def __post_init__(self) -> None:
        check_trajectory_id(self.trajectory_id)
        check_step(self.trajectory_id, self.step)


@dataclass(slots=True)
class StepRecord:
    """One logged step as a reader sees it. `stored_in` differs from `trajectory_id` for a fork's shared prefix."""

    trajectory_id: str
    step: int
    request_hash: str
    kind: str
    sandbox_id: str
    state: StepState
    started_at: float = 0.0
    finished_at: float = 0.0
    result: bytes | None = None
    request: bytes = b""
    error: str = ""
    stored_in: str = ""


@dataclass(slots=True)
class TrajectoryInfo:
    trajectory_id: str
    parent_id: str = ""
    fork_step: int = 0
    sandbox_id: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    own_steps: int = 0  # steps logged in this trajectory itself (a fork's shared prefix not counted)
    snapshots: list[tuple[int, str]] = field(default_factory=list)  # (step after which it was taken, ref)


@dataclass(slots=True)
class LogStats:
    appends: int = 0
    fsyncs: int = 0  # for PostgreSQL: commits
    torn_bytes_truncated: int = 0


class TrajectoryLog(ABC):
    """Append-only, durable record of every step of every trajectory."""

    # --- writes (each durable before it returns) ---
    @abstractmethod
    def begin(self, ref: StepRef, request: bytes = b"") -> bool:
        """Log the intent to execute a step; False if the step already has a live (non-abandoned) record."""

    @abstractmethod
    def complete(self, ref: StepRef, result: bytes, started_at: float, finished_at: float) -> None:
        """Log a step's result (after its intent)."""

    @abstractmethod
    def abandon(self, trajectory_id: str, step: int, error: str) -> None:
        """Mark an intent as not completed (it failed, or an operator chose to re-run it)."""

    @abstractmethod
    def _create_fork(self, parent: TrajectoryInfo, at_step: int, new_id: str) -> None:
        """Store the fork record (after the checks in `fork`)."""

    @abstractmethod
    def attach(self, trajectory_id: str, sandbox_id: str) -> None:
        """Record that the trajectory now runs in `sandbox_id` (so a resumed rollout finds it)."""

    @abstractmethod
    def record_snapshot(self, trajectory_id: str, step: int, snapshot_ref: str) -> None:
        """Record a sandbox snapshot taken after `step` (what resume restores when the sandbox is gone)."""

    @abstractmethod
    def _delete(self, trajectory_ids: list[str]) -> None:
        """Drop trajectories (after the checks in `delete`)."""

    # --- reads ---
    @abstractmethod
    def _own_step(self, trajectory_id: str, step: int, with_result: bool) -> StepRecord | None:
        """The step as stored in this very trajectory (no fork resolution); its request is not read."""

    @abstractmethod
    def _own_steps(self, trajectory_id: str, with_results: bool) -> list[StepRecord]:
        """Every step stored in this very trajectory, ordered by step; `with_results` reads requests too."""

    @abstractmethod
    def info(self, trajectory_id: str) -> TrajectoryInfo | None:
        """Metadata of one trajectory, None if never logged (or deleted)."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[TrajectoryInfo]:
        """Every trajectory whose id starts with `prefix`."""

    @abstractmethod
    def stats(self) -> LogStats: ...

    @abstractmethod
    def close(self) -> None: ...

    # --- shared rules ---
    def lookup(self, trajectory_id: str, step: int, with_result: bool = True) -> StepRecord | None:
        """The step as the trajectory sees it: a fork's steps before its fork point come from its parent."""
        current = trajectory_id
        while True:
            info = self.info(current)
            if info is not None and info.parent_id and step < info.fork_step:
                current = info.parent_id
                continue
            record = self._own_step(current, step, with_result)
            if record is not None:
                record.stored_in = current
                record.trajectory_id = trajectory_id
            return record

    def steps(self, trajectory_id: str, with_results: bool = True) -> list[StepRecord]:
        """Every step of the trajectory, shared fork prefix included, ordered by step."""
        info = self.info(trajectory_id)
        if info is None:
            return []
        prefix: list[StepRecord] = []
        if info.parent_id:
            prefix = [r for r in self.steps(info.parent_id, with_results) if r.step < info.fork_step]
        own = self._own_steps(trajectory_id, with_results)
        for record in own:
            record.stored_in = trajectory_id
        for record in prefix:
            record.trajectory_id = trajectory_id
        return prefix + [r for r in own if not info.parent_id or r.step >= info.fork_step]

    def fork(self, parent_id: str, at_step: int, new_id: str) -> TrajectoryInfo:
        """Start `new_id` sharing steps [0, at_step) of `parent_id` (GRPO samples of one prompt)."""
        check_trajectory_id(new_id)
        parent = self.info(parent_id)
        if parent is None:
            raise InvalidSpec(f"cannot fork trajectory {parent_id!r}: it was never logged")
        if self.info(new_id) is not None:
            raise InvalidSpec(f"cannot fork {parent_id!r} into {new_id!r}: {new_id!r} already exists; pick a new id")
        done = {r.step for r in self.steps(parent_id, with_results=False) if r.state is StepState.DONE}
        missing = [s for s in range(at_step) if s not in done]
        if at_step < 0 or missing:
            raise InvalidSpec(
                f"cannot fork trajectory {parent_id!r} at step {at_step}: steps {missing[:5]} are not logged yet; "
                "fork at or before the first step without a result"
            )
        self._create_fork(parent, at_step, new_id)
        forked = self.info(new_id)
        assert forked is not None
        return forked

    def delete(self, trajectory_id: str) -> None:
        children = [t.trajectory_id for t in self.list() if t.parent_id == trajectory_id]
        if children:
            raise InvalidSpec(
                f"cannot delete trajectory {trajectory_id!r}: forks {children[:5]} share its prefix; delete them first"
            )
        if self.info(trajectory_id) is not None:
            self._delete([trajectory_id])

    def gc(self, max_age_s: float, now: float | None = None) -> list[str]:
        """Retention: drop trajectories idle for longer than `max_age_s`, keeping any a kept fork still shares."""
        cutoff = (time.time() if now is None else now) - max_age_s
        everything = {t.trajectory_id: t for t in self.list()}
        keep = {tid for tid, t in everything.items() if t.updated_at >= cutoff}
        frontier = list(keep)
        while frontier:
            parent = everything[frontier.pop()].parent_id
            if parent and parent in everything and parent not in keep:
                keep.add(parent)
                frontier.append(parent)
        doomed = sorted(set(everything) - keep)
        if doomed:
            self._delete(doomed)
        return doomed

    def __enter__(self) -> TrajectoryLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
