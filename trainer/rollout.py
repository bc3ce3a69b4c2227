"""The multi-turn agent loop: generate → parse DSML → run calls in the rollout's sandbox → append results.

Tokens in, tokens out: a rollout's `ids` are the prompt pieces' ids, the exact sampled ids, and the ids of the
tool-result pieces, concatenated, never re-tokenised. `mask` is 1 on sampled ids only, so tool results and
prompts get no policy gradient.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

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
from trainer.rollout_lanes import LATER, BatchStats, SandboxLanes
from trainer.sampler import sample, sample_generator
from trainer.tasks import Problem, get_task
from trainer.tokenizer import V4Tokenizer
from trainer.tools import SandboxLost, ToolBox, lost, open_toolbox

T = TypeVar("T")


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
    only after the step's checkpoint, so a step interrupted even after its rollouts finished still replays;
    without it each sandbox is destroyed right after its rollout's verifier, and a SystemExit/KeyboardInterrupt
    (a Ray worker whose trainer died) destroys no more, so the resumed step re-attaches to the rest.

    A rollout whose sandbox is lost (destroyed, expired, never created) starts over, up to
    `rollout_cfg.max_retries` times, in a new sandbox rebuilt from its trajectory log: the same RNG samples the
    same tokens, its logged calls replay (and re-execute in the new sandbox, rebuilding its state), and it goes on
    live from where the log ends. Past the budget it fails alone (`stop_reason` sandbox_lost or timeout).
    `after_step(box)` runs after each logged call of any rollout (a test's protocol point). `schedule`: each
    turn is sampled by the version it names (partial rollouts); `policy_version` then only tags a rollout that
    failed before its first turn.

    Sampling is batched; the sandbox work (creates and file writes, each turn's tool calls, verifiers, destroys)
    runs beside it on `rollout_cfg.sandbox_concurrency` threads, in one lane per rollout (trainer.rollout_lanes),
    so `after_step` may run on any of them. `stats` (optional) receives the wall time the loop was blocked on
    that work.
    """
    by_id = dict(jobs)
    attempts = dict.fromkeys(by_id, 0)
    finished: dict[str, _Live] = {}
    pending = list(jobs)
    work = SandboxLanes(rollout_cfg.sandbox_concurrency, stats if stats is not None else BatchStats())
    try:
        while pending:
            batch = _attempt(model, tok, client, pending, rollout_cfg, sandbox_cfg, seed, policy_version, after_step,
                             rebuild={tid for tid, _ in pending if attempts[tid] > 0}, work=work, schedule=schedule,
                             keep_sandboxes=keep_sandboxes)
            pending, gone = [], []
            for x in batch:
                tid = x.rollout.trajectory_id
                attempts[tid] += 1
                x.rollout.attempts = attempts[tid]
                if x.lost is not None:
                    gone.append(x)
                    if attempts[tid] <= rollout_cfg.max_retries:
                        pending.append((tid, by_id[tid]))
                        continue
                    x.rollout.stop_reason, x.rollout.reward = x.lost.stop_reason, 0.0
                finished[tid] = x
            for x in gone:
                work.submit(x, lambda x=x: _close_box(x))
            work.wait(gone)
    except Exception:
        _close(list(finished.values()))
        raise
    finally:
        work.close()
    return [finished[tid].rollout for tid, _ in jobs]


def _attempt(model: PreTrainedModel, tok: V4Tokenizer, client: dsec.Client, jobs: list[tuple[str, Problem]],
             rollout_cfg: RolloutConfig, sandbox_cfg: SandboxConfig, seed: int, policy_version: int,
             after_step: Callable[[ToolBox], None] | None, rebuild: set[str], work: SandboxLanes,
             schedule: VersionSchedule | None = None, keep_sandboxes: bool = True) -> list[_Live]:
    """One try of each job, batched; a rollout whose sandbox is lost stops there with `lost` set.

    The order of work, and why it is deterministic: turn t samples, as one batch (per version), every rollout
    that was still going after turn t - 1's tool results; which rollouts those are depends only on what they
    sampled and what their calls returned, never on timing, so a rerun or a resume batches (and so samples)
    alike. Sandbox work runs beside the sampling: the sandboxes are created and set up while turn 0 is sampled
    (turn 0 needs only the prompt; a rollout whose set-up fails is sampled anyway, then stops as lost), a row's
    calls start as soon as the sampler finishes that row, and a finished rollout's verifier (and destroy) runs
    while the others go on. With `rollout_cfg.waves` > 1 the batch is cut into fixed slices sampled in turn
    (wave 0's turn t, wave 1's turn t, ..., wave 0's turn t + 1): a wave's calls run while the other waves are
    sampled, and the loop waits only before a wave's next turn, for that wave's rollouts that go on, and at the
    end. Which rows share a sampler batch still depends on outcomes alone."""
    mode = rollout_cfg.thinking
    room = rollout_cfg.max_total_tokens
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

    def finish(x: _Live) -> None:
        """The verifier, then (unless the driver keeps sandboxes for replay) the destroy; not for a lost one."""
        if x.lost is not None:
            return
        _finish(x)
        if not keep_sandboxes and x.lost is None:
            _close_box(x)

    def goes_on(x: _Live, turn: int) -> bool:
        return not x.done and len(x.rollout.ids) < room and turn + 1 < rollout_cfg.max_turns

    def after_turn(x: _Live, turn: int) -> None:
        """Row x's turn is sampled (on the loop's thread): hand its calls, then its verifier if it stops, to its
        lane; a turn without calls needs no sandbox before the next."""
        if x.calls:
            def calls(x: _Live) -> None:
                if x.lost is not None:  # its set-up failed: nothing to run
                    return
                _run_calls(x)
                _answer(x, tok, mode)
                if not goes_on(x, turn):
                    finish(x)

            work.submit(x, lambda: calls(x))
            return
        _answer(x, tok, mode)
        if not goes_on(x, turn):
            work.submit(x, lambda: finish(x), LATER)

    try:
        for tid, problem in jobs:
            x = _Live(Rollout(tid, problem.id, problem.family, [], [], policy_version=policy_version), problem, None,
                      sample_generator(seed, tid.split("/", 1)[-1]))
            live.append(x)
            ids = prompt_ids(tok, problem, mode)
            x.rollout.ids, x.rollout.mask, x.rollout.logprobs = ids, [0] * len(ids), [0.0] * len(ids)
        for x in live:
            work.submit(x, lambda x=x: open_box(x))
        for x in live:
            if len(x.rollout.ids) >= room:  # no room for a first turn: verified as it is
                work.submit(x, lambda x=x: finish(x), LATER)
        waves = [[x for x in wave if len(x.rollout.ids) < room]
                 for wave in _waves(live, rollout_cfg.waves, rollout_cfg.min_wave_rows)]
        for turn in range(rollout_cfg.max_turns):
            if not any(waves):
                break
            for w, active in enumerate(waves):
                if turn > 0:  # its previous turn's calls ran while the other waves were sampled
                    work.wait(active)
                    # decided once their lanes are idle: a lost sandbox (set-up or call) has stopped its rollout
                    active = [x for x in active if not x.done and len(x.rollout.ids) < room]
                if not active:
                    continue
                for version, group in _by_version(active, turn, schedule, policy_version).items():
                    _sample_turn(model if schedule is None else schedule.model(version), version, group, tok,
                                 rollout_cfg, lambda x, turn=turn: after_turn(x, turn))
                going = [x for x in active if not x.done and len(x.rollout.ids) < room]
                waves[w] = going if turn + 1 < rollout_cfg.max_turns else []
        work.wait(live)
    except Exception:
        work.abort()
        _close(live)
        raise
    return live


def _waves(live: list[T], waves: int, min_rows: int) -> list[list[T]]:
    """The batch cut into up to `waves` contiguous slices of at least `min_rows` rollouts (sizes differ by one at
    most; one slice if the batch is too small): fixed by position alone, so which rollouts share a sampler batch
    never depends on timing."""
    count = max(1, min(waves, len(live) // min_rows))
    size, extra = divmod(len(live), count)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]
    return [live[a:b] for a, b in zip(bounds, bounds[1:])]


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
                 rollout_cfg: RolloutConfig, after: Callable[[_Live], None]) -> None:
    """One assistant turn of each rollout in `active`, batched, sampled by `model` (policy `version`);
    `after(x)` runs as soon as x's turn is appended and parsed, while the longer rows are still sampled."""
    room = rollout_cfg.max_total_tokens
    budgets = [min(rollout_cfg.max_new_tokens, room - len(x.rollout.ids)) for x in active]
    logprobs: list[list[float]] = [[] for _ in active]

    def done(i: int, new: list[int]) -> None:
        x = active[i]
        if not x.rollout.turn_versions:
            x.rollout.policy_version = version
        x.rollout.turn_versions.append(version)
        _advance(x, new, logprobs[i], tok, rollout_cfg.thinking)
        after(x)

    sample(model, [x.rollout.ids for x in active], [x.gen for x in active], max_new_tokens=budgets,
           eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p,
           logprobs=logprobs, on_done=done)


def _finish(x: _Live) -> None:
    """Say why the rollout stopped and reward it: the task's verifier (in the sandbox, so a sandbox lost here
    retries the rollout too), or 0 without one when a budget cut it (`length`: rewarded 0 whatever it would
    verify as, so its verifier, a process in the sandbox, would run for nothing)."""
    r, box = x.rollout, x.box
    assert box is not None
    if not r.stop_reason:
        r.stop_reason = "tool_error" if x.last_failed else "length"
    started = time.perf_counter()
    try:
        r.reward = 0.0 if r.stop_reason == "length" else get_task(x.problem.family).verify(x.problem, r.final, box)
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
        _close_box(x)


def _close_box(x: _Live) -> None:
    """Destroy x's sandbox once (a sandbox task: it may run in x's lane)."""
    box, x.box = x.box, None
    if box is not None:
        box.close()


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
