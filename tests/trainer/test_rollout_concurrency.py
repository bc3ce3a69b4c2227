"""Concurrent sandbox work in the rollout loop (issue #21 point 8): with `rollout.sandbox_concurrency` 8 a batch's
creates, file writes, tool calls and verifiers overlap across rollouts, and the batch comes out exactly as it does
one rollout after another (concurrency 1): the same ids, rewards, tool results and trajectory logs; a sandbox lost
in one rollout is retried without disturbing the others. With `rollout.waves` 2 one wave's tool calls run while the
other wave is sampled, and the batch is still the same. Real dsec server, real container sandboxes."""

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


def _cfg(concurrency: int, waves: int = 1) -> RolloutConfig:
    return CFG.model_copy(update={"sandbox_concurrency": concurrency, "waves": waves, "min_wave_rows": 1})


def _summary(r: Rollout) -> tuple:
    """Everything a rollout carries that does not depend on timing or on the run's name."""
    return (r.trajectory_id.split("/", 1)[1], r.problem_id, r.ids, r.mask, r.logprobs, r.reward, r.turns, r.final,
            r.tool_calls, r.tools_live, r.tools_replayed, r.parse_errors, r.sampled_hash, r.stop_reason, r.attempts,
            r.turn_versions)


LOGPROBS = 4  # the position of the recorded log-probs in a `_summary`


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


@pytest.mark.timeout(900)
def test_waves_sample_the_second_wave_while_the_firsts_sandbox_work_runs(policy, client, one_by_one, monkeypatch):
    """Waves of 4: a first-wave rollout's set-up (its first logged file write) holds until the loop samples the first
    turn of second-wave rollouts alone. Without waves the first turn is one batch of both, so the hold could never
    end; with them the loop samples the second wave without waiting for the first's sandbox work. A protocol point,
    not a timing. The rollouts and their logs are those of the one-by-one batch."""
    import trainer.rollout as rollout_module

    model, tok = policy
    control, control_logs = one_by_one
    jobs = _jobs(f"waves-{time.time_ns()}")
    first_wave = {tid for tid, _ in jobs[:4]}
    second_wave_sampled = threading.Event()
    holders: list[str] = []
    lock = threading.Lock()
    sample_turn = rollout_module._sample_turn

    def sampling(model, version, active, *args, **kwargs):
        first_turn = all(x.rollout.turns == 0 for x in active)
        if active and first_turn and not {x.rollout.trajectory_id for x in active} & first_wave:
            second_wave_sampled.set()
        return sample_turn(model, version, active, *args, **kwargs)

    def hold_once(box) -> None:
        with lock:
            first = box.trajectory.id in first_wave and not holders
            if first:
                holders.append(box.trajectory.id)
        if first:
            assert second_wave_sampled.wait(MEET_TIMEOUT_S), "the second wave waited for the first's set-up"

    monkeypatch.setattr(rollout_module, "_sample_turn", sampling)
    out = run_rollouts(model, tok, client, jobs, _cfg(8, waves=2), SANDBOX, seed=0, after_step=hold_once)
    assert holders and second_wave_sampled.is_set()
    # the same samples; their recorded log-probs to float rounding (a smaller batch rounds its matmuls otherwise)
    without_logprobs = [tuple(f for i, f in enumerate(_summary(r)) if i != LOGPROBS) for r in out]
    assert without_logprobs == [tuple(f for i, f in enumerate(_summary(r)) if i != LOGPROBS) for r in control]
    for r, want in zip(out, control):
        assert max(abs(a - b) for a, b in zip(r.logprobs, want.logprobs)) < 1e-5
    assert [_log(client, r.trajectory_id) for r in out] == control_logs


def test_waves_are_fixed_slices_of_the_batch():
    from trainer.rollout import _waves

    assert _waves(list(range(64)), 2, 32) == [list(range(32)), list(range(32, 64))]
    assert _waves(list(range(32)), 2, 32) == [list(range(32))]  # a GRPO step of the demo config: one wave
    assert _waves(list(range(10)), 2, 8) == [list(range(10))]  # too few rows for two waves of 8
    assert _waves(list(range(7)), 3, 2) == [[0, 1, 2], [3, 4], [5, 6]]
    assert _waves([], 2, 8) == [[]]


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
