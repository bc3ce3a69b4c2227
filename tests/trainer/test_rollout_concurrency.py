"""Concurrent sandbox work in the rollout loop (issue #21 point 8): with `rollout.sandbox_concurrency` 8 a batch's
creates, file writes, tool calls and verifiers overlap across rollouts, and the batch comes out exactly as it does
one rollout after another (concurrency 1): the same ids, rewards, tool results and trajectory logs; a sandbox lost
in one rollout is retried without disturbing the others. Real dsec server, real container sandboxes."""

from __future__ import annotations

import re
import threading
import time

import pytest

import dsec
from dsec.v1 import sandbox_pb2 as pb
from tests.trainer.test_failure_isolation import KillAfter
from trainer.config import RolloutConfig, SandboxConfig
from trainer.data import problems
from trainer.rollout import BatchStats, Rollout, run_rollouts

CFG = RolloutConfig(max_turns=2, max_new_tokens=40, max_total_tokens=400)
SANDBOX = SandboxConfig(image="python", tool_timeout_s=30)
RAN = re.compile(rb"(Ran \d+ tests?) in \d+\.\d+s")
MEET_TIMEOUT_S = 300  # bounds a failure only: the two rollouts meet as soon as both have written a file


def _jobs(run: str) -> list[tuple[str, object]]:
    """Two fix_module prompts (files written at setup: logged steps) and two arithmetic ones, each a group of 2."""
    batch = problems(["fix_module"], "train", 2, 0) + problems(["arithmetic"], "train", 2, 0)
    return [(f"{run}/step-0/prompt-{p}/sample-{g}", prob) for p, prob in enumerate(batch) for g in range(2)]


def _cfg(concurrency: int) -> RolloutConfig:
    return CFG.model_copy(update={"sandbox_concurrency": concurrency})


def _summary(r: Rollout) -> tuple:
    """Everything a rollout carries that does not depend on timing or on the run's name."""
    return (r.trajectory_id.split("/", 1)[1], r.problem_id, r.ids, r.mask, r.logprobs, r.reward, r.turns, r.final,
            r.tool_calls, r.tools_live, r.tools_replayed, r.parse_errors, r.sampled_hash, r.stop_reason, r.attempts,
            r.turn_versions)


def _log(client: dsec.Client, trajectory_id: str) -> list[tuple]:
    """The trajectory's logged steps: number, kind, state, request hash and result, less what measures time (an
    exec's duration, and unittest's "Ran 1 test in 0.001s" in the verifiers' output)."""
    steps = []
    for s in dsec.trajectory(trajectory_id, client=client).steps():
        result = s.result
        if s.kind == "exec":
            record = pb.ExecRecord.FromString(result)
            record.status.ClearField("duration_s")
            record.stdout, record.stderr = (RAN.sub(rb"\1", record.stdout), RAN.sub(rb"\1", record.stderr))
            result = record.SerializeToString(deterministic=True)
        steps.append((s.step, s.kind, s.state, s.request_hash, result, s.error))
    return steps


@pytest.fixture(scope="module")
def one_by_one(policy, dsec_server):
    """The batch with sandbox_concurrency 1 (the loop's order before concurrency), and its trajectory logs."""
    model, tok = policy
    with dsec.Client(address=dsec_server.address) as c:
        out = run_rollouts(model, tok, c, _jobs(f"seq-{time.time_ns()}"), _cfg(1), SANDBOX, seed=0)
        return out, [_log(c, r.trajectory_id) for r in out]


class Meet:
    """Holds the first logged call of two rollouts until both have made theirs: a batch whose sandbox work ran one
    rollout after another could never pass it, so passing proves the work overlapped (at a protocol point, not a
    timing). Records the threads the calls ran on."""

    def __init__(self, a: str, b: str) -> None:
        self.ids, self.barrier, self.met = (a, b), threading.Barrier(2, timeout=MEET_TIMEOUT_S), set()
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, box) -> None:
        self.threads.add(threading.current_thread().name)
        tid = box.trajectory.id
        with self.lock:
            first = tid in self.ids and tid not in self.met
            self.met.add(tid)
        if first:
            self.barrier.wait()


@pytest.mark.timeout(900)
def test_concurrent_sandbox_work_gives_the_same_rollouts_and_logs(policy, client, one_by_one):
    model, tok = policy
    control, control_logs = one_by_one
    jobs = _jobs(f"conc-{time.time_ns()}")
    meet = Meet(jobs[0][0], jobs[2][0])  # two fix_module rollouts: their first logged call is a setup file write
    stats = BatchStats()
    out = run_rollouts(model, tok, client, jobs, _cfg(8), SANDBOX, seed=0, after_step=meet, stats=stats)
    assert meet.met >= set(meet.ids) and len(meet.threads) >= 2
    assert all(name.startswith("rollout-sandbox") for name in meet.threads)
    assert [r.trajectory_id for r in out] == [tid for tid, _ in jobs]
    assert [_summary(r) for r in out] == [_summary(r) for r in control]
    logs = [_log(client, r.trajectory_id) for r in out]
    assert [len(steps) for steps in logs] == [len(steps) for steps in control_logs]
    for steps, want in zip(logs, control_logs):
        for step, wanted in zip(steps, want):
            assert step == wanted
    # each trajectory's calls were issued one at a time, in order: steps 0..n-1, all done
    for steps in logs:
        assert [s[0] for s in steps] == list(range(len(steps))) and all(s[2] == "done" for s in steps)
    # at least every verifier ran in its sandbox (a rollout a budget cut is rewarded 0 without one)
    assert sum(r.tools_live for r in out) >= sum(r.stop_reason != "length" for r in out)
    assert stats.sandbox_wait_s > 0 and all(r.sandbox_s > 0 for r in out)


@pytest.mark.timeout(900)
def test_a_lost_sandbox_is_retried_without_disturbing_the_others(policy, client, one_by_one):
    model, tok = policy
    control, _ = one_by_one
    jobs = _jobs(f"conc-kill-{time.time_ns()}")
    kill = KillAfter(client, jobs[1][0])
    out = run_rollouts(model, tok, client, jobs, _cfg(8), SANDBOX, seed=0, after_step=kill)
    assert kill.killed
    assert [r.attempts for r in out] == [1, 2] + [1] * (len(jobs) - 2)
    assert out[1].sandbox_id and out[1].sandbox_id != kill.killed and not out[1].failed
    # the retry reproduces the untouched run, and no other rollout noticed
    assert [r.ids for r in out] == [r.ids for r in control]
    assert [r.reward for r in out] == [r.reward for r in control]
    assert [r.stop_reason for r in out] == [r.stop_reason for r in control]


def test_an_exception_in_one_rollouts_sandbox_work_surfaces_as_itself(policy, client):
    """A bug in a task (here: the after_step hook) is raised to the caller as the same exception, not wrapped, and
    every sandbox the batch made is destroyed."""
    model, tok = policy
    jobs = _jobs(f"conc-err-{time.time_ns()}")
    boom = RuntimeError("boom in after_step")
    boxes: list[str] = []
    lock = threading.Lock()

    def hook(box) -> None:
        with lock:
            boxes.append(box.sandbox.id)
        if box.trajectory.id == jobs[2][0]:
            raise boom

    with pytest.raises(RuntimeError) as info:
        run_rollouts(model, tok, client, jobs, _cfg(8), SANDBOX, seed=0, after_step=hook)
    assert info.value is boom
    assert boxes
    live = {s.id for s in client.list()}
    assert not live & set(boxes)
