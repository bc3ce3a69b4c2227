"""The multi-turn agent loop: generate → parse DSML → run calls in the rollout's sandbox → append results.

Tokens in, tokens out: a rollout's `ids` are the prompt pieces' ids, the exact sampled ids, and the ids of the
tool-result pieces, concatenated, never re-tokenised. `mask` is 1 on sampled ids only, so tool results and
prompts get no policy gradient.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol

import dsec
import torch
from dsec.errors import DsecError
from transformers import PreTrainedModel

from trainer.config import RolloutConfig, SandboxConfig
from trainer.encoding import (
    USER,
    DSMLParseError,
    Message,
    ToolCall,
    assistant_opener,
    parse_assistant,
    render_segments,
    render_tool_results,
)
from trainer import tito
from trainer.sampler import sample, sample_generator
from trainer.tasks import Problem, get_task
from trainer.tokenizer import V4Tokenizer
from trainer.tools import SandboxLost, ToolBox, lost, open_toolbox


# Why a rollout ended. eos: the policy answered; length: cut by the token or turn budget (rewarded 0);
# tool_error: the turn budget ran out right after a failed call or malformed DSML; sandbox_lost / timeout: the
# sandbox died (or could not be created) / ran past its lifetime on every try (the rollout failed: reward 0, and
# its group is dropped or filled per algo.on_group_failure).
STOP_REASONS = ("eos", "length", "tool_error", "sandbox_lost", "timeout")
FAILED = ("sandbox_lost", "timeout")


@dataclass
class Rollout:
    trajectory_id: str
    problem_id: str
    family: str
    ids: list[int]
    mask: list[int]
    reward: float = 0.0
    turns: int = 0
    final: str = ""
    tool_calls: int = 0
    tools_live: int = 0
    tools_replayed: int = 0
    parse_errors: int = 0
    sandbox_id: str = ""
    sampled_hash: int | None = None  # trainer.tito rolling hash of every sampled id, in order (None: none yet)
    # log π_rollout of each id where mask = 1 (0.0 elsewhere), as the sampler computed it; [] when not recorded
    logprobs: list[float] = field(default_factory=list)
    # the learner step whose weights sampled its first turn (staleness = trained-at version - this: the oldest
    # of its tokens); `turn_versions`: the version that sampled each assistant turn (a partial rollout of
    # trainer.async_grpo picks up newer weights between turns, so later turns may carry newer versions)
    policy_version: int = 0
    turn_versions: list[int] = field(default_factory=list)
    stop_reason: str = ""  # one of STOP_REASONS
    attempts: int = 1  # sandboxes this rollout ran in (1 + retries after a lost sandbox)
    # wall seconds this rollout's sandbox calls took (create, files, tools, verifier); with
    # rollout.sandbox_concurrency > 1 the calls of a batch overlap, so the time the loop itself waited on
    # sandboxes is `BatchStats.sandbox_wait_s`, not the sum of these (equal at concurrency 1)
    sandbox_s: float = 0.0

    @property
    def failed(self) -> bool:
        return self.stop_reason in FAILED


@dataclass
class BatchStats:
    """What one `run_rollouts` call spent on its calling thread. Kept apart from the rollouts because concurrent
    sandbox work makes the per-rollout `sandbox_s` add up to more than the loop's own wait."""

    sandbox_wait_s: float = 0.0  # wall seconds the loop was blocked on sandbox phases (setup, tool calls, verifiers)


class VersionSchedule(Protocol):
    """Which policy version samples each turn (trainer.async_grpo's partial rollouts); without one, every turn
    of every rollout is sampled by the model passed in, tagged `policy_version`."""

    def versions(self, trajectory_ids: list[str], turn: int) -> list[int]:
        """The version that samples `turn` of each rollout; the same answer whenever asked again (a retry or a
        resumed rollout must sample the same tokens to replay its logged calls)."""
        ...

    def model(self, version: int) -> PreTrainedModel:
        """The policy with that version's weights."""
        ...


@dataclass
class _Live:
    rollout: Rollout
    problem: Problem
    box: ToolBox | None
    gen: torch.Generator
    done: bool = False
    last_failed: bool = False  # the latest turn's call failed or its DSML was malformed
    lost: SandboxLost | None = None
    history: list[str] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)  # the latest turn's calls, not yet run
    results: list[str] | None = None  # the latest turn's tool results, not yet appended


class _SandboxWork:
    """Runs one phase of a batch's sandbox work (one task per rollout) on `workers` threads, and charges the wall
    time the calling thread waits for it to `stats`.

    Why threads: every task waits on the dsec server (other processes), so tasks of different rollouts overlap;
    each task runs its rollout's calls in order, so a trajectory's steps are still issued one at a time. With one
    worker the tasks run on the calling thread, one after another (the loop's order before this existed)."""

    def __init__(self, workers: int, stats: BatchStats) -> None:
        self.stats = stats
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="rollout-sandbox") if workers > 1 else None

    def each(self, items: Iterable[_Live], task: Callable[[_Live], None]) -> None:
        """`task(x)` for every x; the first exception (in batch order) is raised after the tasks already running
        have ended, and tasks not yet started are not run (as the one-by-one loop stops at its first failure)."""
        started = time.perf_counter()
        try:
            if self._pool is None:
                for x in items:
                    task(x)
                return
            # each task in its own copy of the caller's context: a dsec trajectory context entered by one rollout
            # never leaks into another's calls
            futures: list[Future[None]] = [self._pool.submit(contextvars.copy_context().run, task, x) for x in items]
            wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                f.cancel()
            wait(futures)
            for f in futures:
                if not f.cancelled() and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
        finally:
            self.stats.sandbox_wait_s += time.perf_counter() - started

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def prompt_ids(tok: V4Tokenizer, problem: Problem, mode: str) -> list[int]:
    task = get_task(problem.family)
    msgs = [Message(role="system", content=task.system), Message(role="user", content=problem.prompt)]
    return [i for text, _ in render_segments(msgs, task.tools, mode) for i in tok.encode(text)]  # type: ignore[arg-type]


def tool_result_ids(tok: V4Tokenizer, results: list[str], mode: str) -> list[int]:
    return tok.encode(USER + render_tool_results(results) + assistant_opener(mode))  # type: ignore[arg-type]


def run_rollouts(
    model: PreTrainedModel,
    tok: V4Tokenizer,
    client: dsec.Client,
    jobs: list[tuple[str, Problem]],
    rollout_cfg: RolloutConfig,
    sandbox_cfg: SandboxConfig,
    seed: int,
    keep_sandboxes: bool = False,
    policy_version: int = 0,
    after_step: Callable[[ToolBox], None] | None = None,
    schedule: VersionSchedule | None = None,
    stats: BatchStats | None = None,
) -> list[Rollout]:
    """Run one rollout per (trajectory id, problem), all batched together; each gets its own sandbox.

    The sampling RNG of a rollout is keyed by (seed, trajectory id minus its leading run component) only, so
    re-running an interrupted step samples the same tokens, re-issues the same tool calls, and the trajectory log
    answers them; and two runs with the same seed sample alike. `keep_sandboxes`: the GRPO driver destroys them
    only after the step's checkpoint, so a step interrupted even after its rollouts finished still replays.

    A rollout whose sandbox is lost (destroyed, expired, never created) starts over, up to
    `rollout_cfg.max_retries` times, in a new sandbox rebuilt from its trajectory log: the same RNG samples the
    same tokens, its logged calls replay (and re-execute in the new sandbox, rebuilding its state), and it goes on
    live from where the log ends. Past the budget it fails alone (`stop_reason` sandbox_lost or timeout).
    `after_step(box)` runs after each logged call of any rollout (a test's protocol point). `schedule`: each
    turn is sampled by the version it names (partial rollouts); `policy_version` then only tags a rollout that
    failed before its first turn.

    Sampling is batched; the sandbox work (creates and file writes, each turn's tool calls, verifiers) runs on
    `rollout_cfg.sandbox_concurrency` threads, one task per rollout, so `after_step` may run on any of them.
    `stats` (optional) receives the wall time the loop waited on that work.
    """
    by_id = dict(jobs)
    attempts = dict.fromkeys(by_id, 0)
    finished: dict[str, _Live] = {}
    pending = list(jobs)
    work = _SandboxWork(rollout_cfg.sandbox_concurrency, stats if stats is not None else BatchStats())
    try:
        while pending:
            batch = _attempt(model, tok, client, pending, rollout_cfg, sandbox_cfg, seed, policy_version, after_step,
                             rebuild={tid for tid, _ in pending if attempts[tid] > 0}, work=work, schedule=schedule)
            pending = []
            for x in batch:
                tid = x.rollout.trajectory_id
                attempts[tid] += 1
                x.rollout.attempts = attempts[tid]
                if x.lost is not None and attempts[tid] <= rollout_cfg.max_retries:
                    pending.append((tid, by_id[tid]))
                    _close([x])
                    continue
                if x.lost is not None:
                    x.rollout.stop_reason, x.rollout.reward = x.lost.stop_reason, 0.0
                    _close([x])
                finished[tid] = x
    except Exception:
        _close(list(finished.values()))
        raise
    finally:
        work.close()
    # Not on SystemExit/KeyboardInterrupt (a Ray worker whose trainer died): those sandboxes stay live until
    # their timeout so the resumed step re-attaches to them and replays its logged calls.
    if not keep_sandboxes:
        _close(list(finished.values()))
    return [finished[tid].rollout for tid, _ in jobs]


def _attempt(model: PreTrainedModel, tok: V4Tokenizer, client: dsec.Client, jobs: list[tuple[str, Problem]],
             rollout_cfg: RolloutConfig, sandbox_cfg: SandboxConfig, seed: int, policy_version: int,
             after_step: Callable[[ToolBox], None] | None, rebuild: set[str], work: _SandboxWork,
             schedule: VersionSchedule | None = None) -> list[_Live]:
    """One try of each job, batched; a rollout whose sandbox is lost stops there with `lost` set."""
    mode = rollout_cfg.thinking
    live: list[_Live] = []

    def open_box(x: _Live) -> None:
        tid, problem = x.rollout.trajectory_id, x.problem
        substrate = sandbox_cfg.substrates.get(problem.family, sandbox_cfg.default_substrate)
        started = time.perf_counter()
        try:
            x.box = open_toolbox(client, tid, image=sandbox_cfg.image, substrate=substrate,
                                 timeout_s=sandbox_cfg.tool_timeout_s,
                                 sandbox_timeout_s=sandbox_cfg.sandbox_timeout_s, rebuild=tid in rebuild)
            x.box.after_step, x.box.raise_lost = after_step, True
            for path, content in problem.files.items():
                x.box.write_file(path, content)
        except DsecError as exc:  # could not create, or lost while being set up: retried like a lost one
            x.lost, x.done = SandboxLost(tid, exc), True
        finally:
            x.rollout.sandbox_s += time.perf_counter() - started

    try:
        for tid, problem in jobs:
            x = _Live(Rollout(tid, problem.id, problem.family, [], [], policy_version=policy_version), problem, None,
                      sample_generator(seed, tid.split("/", 1)[-1]))
            live.append(x)
            ids = prompt_ids(tok, problem, mode)
            x.rollout.ids, x.rollout.mask, x.rollout.logprobs = ids, [0] * len(ids), [0.0] * len(ids)
        work.each(live, open_box)
        for turn in range(rollout_cfg.max_turns):
            active = [x for x in live if not x.done and len(x.rollout.ids) < rollout_cfg.max_total_tokens]
            if not active:
                break
            for version, group in _by_version(active, turn, schedule, policy_version).items():
                _sample_turn(model if schedule is None else schedule.model(version), version, group, tok,
                             rollout_cfg)
            work.each([x for x in active if x.calls], _run_calls)
            for x in active:
                _answer(x, tok, mode)
        work.each([x for x in live if x.lost is None], _finish)
    except Exception:
        _close(live)
        raise
    return live


def _by_version(active: list[_Live], turn: int, schedule: VersionSchedule | None, default: int
                ) -> dict[int, list[_Live]]:
    """The turn's rollouts grouped by the version that samples them (one group, in order, without a schedule)."""
    if schedule is None:
        return {default: active}
    groups: dict[int, list[_Live]] = {}
    for x, version in zip(active, schedule.versions([x.rollout.trajectory_id for x in active], turn)):
        groups.setdefault(version, []).append(x)
    return groups


def _sample_turn(model: PreTrainedModel, version: int, active: list[_Live], tok: V4Tokenizer,
                 rollout_cfg: RolloutConfig) -> None:
    """One assistant turn of each rollout in `active`, batched, sampled by `model` (policy `version`)."""
    room = rollout_cfg.max_total_tokens
    budgets = [min(rollout_cfg.max_new_tokens, room - len(x.rollout.ids)) for x in active]
    logprobs: list[list[float]] = [[] for _ in active]
    outs = sample(model, [x.rollout.ids for x in active], [x.gen for x in active], max_new_tokens=budgets,
                  eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=rollout_cfg.temperature,
                  top_p=rollout_cfg.top_p, logprobs=logprobs)
    for x, new, lps in zip(active, outs, logprobs):
        if not x.rollout.turn_versions:
            x.rollout.policy_version = version
        x.rollout.turn_versions.append(version)
        _advance(x, new, lps, tok, rollout_cfg.thinking)


def _finish(x: _Live) -> None:
    """Say why the rollout stopped and reward it: the task's verifier (in the sandbox, so a sandbox lost here
    retries the rollout too), overridden by 0 when a budget cut it. The verifier runs even then, so a rollout's
    logged calls do not depend on how it ended."""
    r, box = x.rollout, x.box
    assert box is not None
    if not r.stop_reason:
        r.stop_reason = "tool_error" if x.last_failed else "length"
    started = time.perf_counter()
    try:
        verdict = get_task(x.problem.family).verify(x.problem, r.final, box)
        r.reward = 0.0 if r.stop_reason == "length" else verdict
    except DsecError as exc:
        if not lost(exc):
            raise
        x.lost, r.stop_reason = SandboxLost(r.trajectory_id, exc), ""
        return
    finally:
        r.sandbox_s += time.perf_counter() - started
    r.tools_live, r.tools_replayed = box.stats.live, box.stats.replayed
    r.sandbox_id = box.sandbox.id


def _close(live: list[_Live]) -> None:
    for x in live:
        if x.box is not None:
            x.box.close()


def _advance(x: _Live, new: list[int], logprobs: list[float], tok: V4Tokenizer, mode: str) -> None:
    """Append one sampled assistant turn and parse it: its calls go to `x.calls` (run by `_run_calls`), a parse
    error's message to `x.results`; or the rollout finishes. Touches no sandbox, so it stays on the loop's thread
    with the tokenizer."""
    r = x.rollout
    r.ids += new
    r.mask += [1] * len(new)
    r.logprobs += logprobs
    r.sampled_hash = tito.extend(r.sampled_hash, new)
    r.turns += 1
    text = tok.decode(new)
    try:
        turn = parse_assistant(text, mode)  # type: ignore[arg-type]
    except DSMLParseError as exc:
        if not text.endswith(tok.decode([tok.eos_id])):
            x.done, r.stop_reason = True, "length"  # cut by the budget mid-block: nothing to run, nothing to answer
            return
        r.parse_errors += 1
        x.results = [f"error: malformed tool call: {exc}"]
        x.last_failed = True
        return
    if not turn.tool_calls or not turn.finished:
        r.final, x.done, r.stop_reason = turn.content, True, "eos" if turn.finished else "length"
        return
    r.tool_calls += len(turn.tool_calls)
    x.calls = turn.tool_calls


def _run_calls(x: _Live) -> None:
    """Run the turn's calls in the rollout's sandbox, in order (one sandbox-work task); a lost sandbox stops the
    rollout with `lost` set."""
    r, box, calls = x.rollout, x.box, x.calls
    assert box is not None
    x.calls = []
    errors = box.stats.errors
    started = time.perf_counter()
    try:
        x.results = [box.execute(call) for call in calls]
    except SandboxLost as exc:
        x.lost, x.done = exc, True
        return
    finally:
        r.sandbox_s += time.perf_counter() - started
    x.last_failed = box.stats.errors > errors


def _answer(x: _Live, tok: V4Tokenizer, mode: str) -> None:
    """Append the turn's tool results (if it has any and its sandbox was not lost) as the next user turn."""
    results, x.results = x.results, None
    if results is None or x.lost is not None:
        return
    r = x.rollout
    extra = tool_result_ids(tok, results, mode)
    r.ids += extra
    r.mask += [0] * len(extra)
    r.logprobs += [0.0] * len(extra)
