"""Tool execution and verifiers through the real dsec server, and the rollout loop against it."""

from __future__ import annotations

import time

import pytest
import torch

import dsec
from trainer.config import RolloutConfig, SandboxConfig
from trainer.data import problems
from trainer.encoding import ToolCall
from trainer.policy import build_policy
from trainer.rollout import run_rollouts
from trainer.tasks import get_task
from trainer.tokenizer import V4Tokenizer
from trainer.tools import open_toolbox


@pytest.fixture
def client(dsec_server):
    c = dsec.Client(address=dsec_server.address)
    yield c
    c.close()


def _box(client, family: str):
    return open_toolbox(client, f"test-{time.time_ns()}/{family}", image="python", substrate="container",
                        timeout_s=30, sandbox_timeout_s=300)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["arithmetic", "fix_module"])
def test_demonstrations_pass_their_verifier_and_wrong_answers_fail(client, family):
    task = get_task(family)
    problem = task.generate("heldout", 3, 0)
    for correct in (True, False):
        box = _box(client, family)
        try:
            for path, content in problem.files.items():
                box.write_file(path, content)
            demo = task.demonstration(problem)
            final = ""
            if correct:
                results = [box.execute(c) for c in demo[0].tool_calls]
                assert all(not r.startswith("error") for r in results), results
                final = demo[-1].content
            assert task.verify(problem, final, box) == (1.0 if correct else 0.0)
        finally:
            box.close()


@pytest.mark.timeout(300)
def test_bad_calls_become_tool_errors_not_crashes(client):
    box = _box(client, "arithmetic")
    try:
        assert box.execute(ToolCall(name="nope", arguments={})).startswith("error: unknown tool")
        assert box.execute(ToolCall(name="run_python", arguments={"code": 5})).startswith("error:")
        assert "ZeroDivisionError" in box.execute(ToolCall(name="run_python", arguments={"code": "1/0"}))
        assert box.stats.errors == 2
    finally:
        box.close()


@pytest.mark.timeout(300)
def test_rollouts_keep_exact_tokens_and_mask_tool_results(client, trainer_assets):
    torch.set_num_threads(2)
    tok = V4Tokenizer.load(trainer_assets["tokenizer"])
    model = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0)
    model.load_state_dict(torch.load(trainer_assets["sft"], weights_only=True))
    model.eval()
    jobs = [(f"test-{time.time_ns()}/r/{i}", p) for i, p in enumerate(problems(["arithmetic", "fix_module"], "train", 4, 0))]
    cfg = RolloutConfig(max_turns=2, max_new_tokens=48, max_total_tokens=400)
    rollouts = run_rollouts(model, tok, client, jobs, cfg, SandboxConfig(image="python"), seed=0)
    assert len(rollouts) == 4
    for r in rollouts:
        assert len(r.ids) == len(r.mask) and sum(r.mask) > 0
        # at least the verifier ran in the sandbox, unless a budget cut it (rewarded 0 without one)
        assert r.tools_live >= 1 or r.stop_reason == "length"
        assert r.reward in (0.0, 1.0)
    # nothing left behind: every rollout sandbox was destroyed
    live = {s.id for s in client.list(labels={"dsec-trainer": "rollout"})}
    assert not live & {r.sandbox_id for r in rollouts}
