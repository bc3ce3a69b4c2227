"""Failure isolation (issue #21 point 3): a real sandbox destroyed mid-rollout, at a protocol point (right after
the rollout's first logged call, read back through the trajectory log), is retried in a fresh sandbox rebuilt
from the log; past the retry budget the rollout fails alone and its group is dropped or filled, never the step.
Sandboxes that cannot be created, and budget cuts, get their typed stop_reason and metrics."""

from __future__ import annotations

import time

import pytest
import torch

import dsec
from dsec.errors import SandboxExpired, SandboxNotFound
from trainer.config import AlgoConfig, RolloutConfig, SandboxConfig
from trainer.data import problems
from trainer.learner import Learner
from trainer.rollout import STOP_REASONS, run_rollouts
from trainer.tools import SandboxLost

CFG = RolloutConfig(max_turns=2, max_new_tokens=40, max_total_tokens=400)
SANDBOX = SandboxConfig(image="python", tool_timeout_s=30)


def _jobs(run: str):
    """Two fix_module prompts (each writes its files first: logged steps) × a group of 2."""
    batch = problems(["fix_module"], "train", 2, 0)
    return [(f"{run}/step-0/prompt-{p}/sample-{g}", prob) for p, prob in enumerate(batch) for g in range(2)]


class KillAfter:
    """Destroys `target`'s sandbox once, right after its `k`-th logged call: the count and the sandbox id are
    read from the trajectory log, so the kill happens at that protocol point whatever the machine's speed."""

    def __init__(self, client: dsec.Client, target: str, k: int = 1) -> None:
        self.client, self.target, self.k = client, target, k
        self.killed: str | None = None

    def __call__(self, box) -> None:
        if self.killed is not None or box.trajectory.id != self.target:
            return
        log = dsec.trajectory(self.target, client=self.client)
        if len(log.steps(with_results=False)) < self.k:
            return
        self.killed = log.sandbox_id
        self.client.destroy(self.killed)


def _learner(model, tok, **algo) -> Learner:
    return Learner(model, AlgoConfig(kl_coef=0.0, **algo), 1e-5, 1.0, tok.pad_id)


@pytest.fixture(scope="module")
def control(policy, dsec_server):
    """The same rollouts, nothing killed (the sampling RNG ignores the run component of the id)."""
    model, tok = policy
    with dsec.Client(address=dsec_server.address) as c:
        return run_rollouts(model, tok, c, _jobs(f"ctl-{time.time_ns()}"), CFG, SANDBOX, seed=0)


@pytest.mark.timeout(900)
def test_a_killed_sandbox_is_retried_rebuilt_from_the_log(policy, client, control):
    model, tok = policy
    jobs = _jobs(f"kill-{time.time_ns()}")
    kill = KillAfter(client, jobs[1][0])
    out = run_rollouts(model, tok, client, jobs, CFG, SANDBOX, seed=0, after_step=kill)
    assert kill.killed
    hit = out[1]
    assert hit.attempts == 2 and not hit.failed and hit.stop_reason in ("eos", "length", "tool_error")
    assert hit.sandbox_id and hit.sandbox_id != kill.killed
    assert [r.attempts for r in out] == [1, 2, 1, 1]
    # the retry samples the same tokens and earns the same reward as the run nobody killed
    assert [r.ids for r in out] == [r.ids for r in control]
    assert [r.reward for r in out] == [r.reward for r in control]
    assert [r.stop_reason for r in out] == [r.stop_reason for r in control]
    with pytest.raises((SandboxNotFound, SandboxExpired)):
        client.connect(kill.killed).exec("true")  # the killed sandbox stays dead; the retry did not revive it
    metrics = _learner(model, tok).update(out, group_size=2)
    assert metrics["rollout_retries"] == 1 and metrics["rollout_failures"] == 0 and metrics["kept_samples"] == 4
    assert sum(metrics[f"stop_{reason}"] for reason in STOP_REASONS) == pytest.approx(1.0)


@pytest.mark.timeout(900)
def test_past_the_budget_the_rollout_fails_alone_and_its_group_is_dropped_or_filled(policy, client):
    model, tok = policy
    jobs = _jobs(f"lost-{time.time_ns()}")
    kill = KillAfter(client, jobs[1][0])
    cfg = CFG.model_copy(update={"max_retries": 0})
    out = run_rollouts(model, tok, client, jobs, cfg, SANDBOX, seed=0, after_step=kill)
    assert kill.killed
    assert out[1].stop_reason == "sandbox_lost" and out[1].failed and out[1].reward == 0.0
    assert not any(r.failed for r in out[:1] + out[2:])

    dropped = _learner(model, tok, on_group_failure="drop").update(out, group_size=2)
    assert dropped["groups_dropped"] == 1 and dropped["kept_samples"] == 2
    assert dropped["stop_sandbox_lost"] == 0.25 and dropped["sandbox_error_rate"] == 0.25
    assert dropped["rollout_failures"] == 1 and dropped["tito_violations"] == 0

    filled = _learner(model, tok, on_group_failure="fill").update(out, group_size=2)
    assert filled["groups_filled"] == 1 and filled["groups_dropped"] == 0 and filled["kept_samples"] == 4
    assert torch.isfinite(torch.tensor(filled["loss"]))


@pytest.mark.timeout(600)
def test_sandboxes_that_cannot_be_created_fail_their_rollouts_not_the_step(policy, client):
    model, tok = policy
    cfg = CFG.model_copy(update={"max_retries": 1})
    out = run_rollouts(model, tok, client, _jobs(f"nocreate-{time.time_ns()}"), cfg,
                       SandboxConfig(image="no-such-image-dsec-test"), seed=0)
    assert all(r.stop_reason == "sandbox_lost" and r.attempts == 2 and r.reward == 0.0 for r in out)
    metrics = _learner(model, tok).update(out, group_size=2)
    assert metrics["groups_dropped"] == 2 and metrics["kept_samples"] == 0 and metrics["sandbox_error_rate"] == 1.0
    assert metrics["rollout_retries"] == 4


@pytest.mark.timeout(600)
def test_cut_samples_are_rewarded_zero_and_can_be_filtered(policy, client):
    model, tok = policy
    cfg = CFG.model_copy(update={"max_new_tokens": 3})
    out = run_rollouts(model, tok, client, _jobs(f"cut-{time.time_ns()}"), cfg, SANDBOX, seed=0)
    cut = [r for r in out if r.stop_reason == "length"]
    assert cut and all(r.reward == 0.0 for r in cut)
    kept = _learner(model, tok).update(out, group_size=2)["kept_samples"]
    filtered = _learner(model, tok, overlong_filter=True).update(out, group_size=2)
    assert filtered["kept_samples"] == kept - len(cut)
    assert filtered["stop_length"] == len(cut) / len(out)


def test_an_expired_sandbox_stops_as_timeout():
    assert SandboxLost("t", SandboxExpired("ran past its lifetime", reason="timeout")).stop_reason == "timeout"
    assert SandboxLost("t", SandboxExpired("gone", reason="destroyed")).stop_reason == "sandbox_lost"
    assert SandboxLost("t", SandboxNotFound("gone")).stop_reason == "sandbox_lost"


@pytest.mark.timeout(300)
def test_a_tool_call_into_a_destroyed_sandbox_is_a_lost_sandbox_not_a_tool_result(client):
    """Inside the rollout loop (raise_lost) the call raises SandboxLost, which retries the rollout; harnesses
    without a retry of their own (TRL, SkyRL-gym) keep getting the error as the call's result text."""
    from trainer.encoding import ToolCall
    from trainer.tools import open_toolbox

    call = ToolCall(name="run_shell", arguments={"command": "echo hi"})
    for raise_lost in (True, False):
        box = open_toolbox(client, f"lostcall-{time.time_ns()}/t", image="python", substrate="container",
                           timeout_s=30, sandbox_timeout_s=300)
        box.raise_lost = raise_lost
        box.write_file("/work/notes.txt", "x")  # the rollout's files make /work, the shell tool's directory
        assert box.execute(call).startswith("exit 0")
        client.destroy(box.sandbox.id)
        if raise_lost:
            with pytest.raises(SandboxLost) as info:
                box.execute(call)
            assert info.value.stop_reason == "sandbox_lost" and box.trajectory.id in str(info.value)
        else:
            assert box.execute(call).startswith("error: Sandbox")
        box.close()


def test_group_isolation_returns_indices_so_side_data_follows():
    from trainer.failures import isolate_groups
    from trainer.rollout import Rollout

    reasons = ["eos", "sandbox_lost", "timeout", "sandbox_lost", "eos", "length"]
    rollouts = [Rollout(f"t/step-0/prompt-{i // 2}/sample-{i % 2}", "p", "f", [0, 1], [0, 1], stop_reason=r)
                for i, r in enumerate(reasons)]
    assert isolate_groups(rollouts, 2, "fill") == ([0, 0, 4, 5], {"groups_dropped": 1.0, "groups_filled": 1.0})
    assert isolate_groups(rollouts, 2, "drop") == ([4, 5], {"groups_dropped": 2.0, "groups_filled": 0.0})
    with pytest.raises(ValueError, match="groups of 4"):
        isolate_groups(rollouts, 4, "drop")
