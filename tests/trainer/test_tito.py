"""The token-in/token-out invariant on every training step: real rollouts pass; a drifted sample is counted and,
by default, refused."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

import dsec
from trainer import tito
from trainer.config import AlgoConfig, RolloutConfig, SandboxConfig
from trainer.data import problems
from trainer.learner import Learner
from trainer.policy import build_policy
from trainer.rollout import run_rollouts
from trainer.tokenizer import V4Tokenizer


def test_hash_is_order_and_content_sensitive():
    assert tito.extend(tito.extend(None, [1, 2]), [3]) == tito.extend(None, [1, 2, 3])
    assert tito.extend(None, [1, 2, 3]) != tito.extend(None, [1, 3, 2])
    assert tito.extend(None, [0]) != tito.extend(None, [])  # appending a token always changes the hash
    assert tito.violation("t", [5, 6, 7], [0, 1, 1], tito.extend(None, [6, 7])) is None
    assert "mask entries" in tito.violation("t", [5, 6], [0, 1, 1], None)
    assert "first prompt token" in tito.violation("t", [5, 6], [1, 1], None)


@pytest.fixture(scope="module")
def rollouts_and_model(trainer_assets, dsec_server):
    """Four real rollouts (dsec sandboxes, the SFT policy) and the policy that sampled them."""
    torch.set_num_threads(2)
    tok = V4Tokenizer.load(trainer_assets["tokenizer"])
    model = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0)
    model.load_state_dict(torch.load(trainer_assets["sft"], weights_only=True))
    model.eval()
    jobs = [(f"tito-{time.time_ns()}/step-0/prompt-{i // 2}/sample-{i % 2}", p)
            for i, p in enumerate(problems(["arithmetic", "fix_module"], "train", 2, 0) * 2)]
    jobs.sort(key=lambda j: j[0])
    with dsec.Client(address=dsec_server.address) as client:
        cfg = RolloutConfig(max_turns=2, max_new_tokens=40, max_total_tokens=400)
        out = run_rollouts(model, tok, client, jobs, cfg, SandboxConfig(image="python"), seed=0)
    return out, model, tok


def _learner(model, tok, **algo) -> Learner:
    return Learner(model, AlgoConfig(kl_coef=0.0, **algo), 1e-5, 1.0, tok.pad_id)


@pytest.mark.timeout(600)
def test_real_rollouts_pass_and_drifted_samples_are_counted(rollouts_and_model):
    rollouts, model, tok = rollouts_and_model
    assert all(r.sampled_hash is not None for r in rollouts)
    metrics = _learner(model, tok).update(rollouts, group_size=2)
    assert metrics["tito_violations"] == 0 and metrics["tito_unchecked"] == 0

    first = rollouts[0]
    sampled_at = first.mask.index(1)
    drifts = {
        # a re-tokenised turn: one sampled id replaced by another id
        "retokenised": replace(first, ids=first.ids[:sampled_at] + [(first.ids[sampled_at] + 1) % tok.vocab_size]
                               + first.ids[sampled_at + 1:]),
        # the mask shifted one position to the left: the last prompt token becomes trainable
        "shifted": replace(first, mask=first.mask[1:] + [0]),
        # a prompt (or tool-result) token marked trainable
        "prompt trainable": replace(first, mask=[0] * (sampled_at - 1) + [1] + first.mask[sampled_at:]),
    }
    for name, drifted in drifts.items():
        batch = [drifted, *rollouts[1:]]
        with pytest.raises(tito.TitoViolation, match=first.trajectory_id):
            _learner(model, tok).update(batch, group_size=2)  # default: the step refuses the batch
        dropped = _learner(model, tok, tito_check="drop").update(batch, group_size=2)
        assert dropped["tito_violations"] == 1, name
        assert dropped["kept_samples"] == len(batch) - 1, name
