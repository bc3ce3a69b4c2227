"""Rollout correction (issue #21 point 2): each registry option's math on hand-built tensors, then a real step:
the sampler's log-probs are recorded, the off-policy metrics appear, and with correction off the loss and the
weights are bit-identical to a batch that carries no sampler log-probs at all."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace

import pytest
import torch

import dsec
from trainer.config import AlgoConfig, RolloutConfig, SandboxConfig
from trainer.core_algos import get_rollout_correction, off_policy_metrics, staleness_histogram
from trainer.data import problems
from trainer.learner import Learner
from trainer.policy import build_policy
from trainer.rollout import run_rollouts
from trainer.sampler import token_logprobs
from trainer.tokenizer import V4Tokenizer

# two samples, three positions; sample 0 samples all three tokens, sample 1 the first two
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
RATIOS = torch.tensor([[1.0, 3.0, 0.25], [1.5, 1.2, 9.0]])  # π_old / π_rollout per token
OLD = torch.log(torch.tensor([[0.5, 0.6, 0.1], [0.3, 0.6, 0.9]]))
ROLLOUT = OLD - torch.log(RATIOS)


def _fix(name: str, threshold: float = 2.0, lower: float = 0.5):
    return get_rollout_correction(name)(OLD, ROLLOUT, MASK, threshold, lower)


def test_none_changes_nothing():
    fix = _fix("none")
    assert fix.weights is None and fix.mask is MASK


def test_tis_token_truncates_each_ratio_at_the_threshold():
    fix = _fix("tis_token")
    expected = torch.tensor([[1.0, 2.0, 0.25], [1.5, 1.2, 0.0]])  # 3 → 2; the unsampled position weighs 0
    assert torch.allclose(fix.weights, expected) and torch.equal(fix.mask, MASK)


def test_tis_seq_truncates_the_product_of_a_samples_ratios():
    fix = _fix("tis_seq", threshold=2.0)
    # sample 0: 1 · 3 · 0.25 = 0.75 (kept); sample 1: 1.5 · 1.2 = 1.8 (the 9 is not sampled: ignored)
    assert torch.allclose(fix.weights, torch.tensor([[0.75, 0.75, 0.75], [1.8, 1.8, 0.0]]))
    clipped = _fix("tis_seq", threshold=1.5).weights
    assert torch.allclose(clipped[1, :2], torch.tensor([1.5, 1.5]))


def test_mask_token_drops_tokens_outside_the_band():
    fix = _fix("mask_token", threshold=2.0, lower=0.5)
    assert fix.weights is None
    assert torch.equal(fix.mask, torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))


def test_mask_seq_drops_whole_samples_beyond_the_threshold():
    assert torch.equal(_fix("mask_seq", threshold=2.0, lower=0.5).mask, MASK)  # 0.75 and 1.8 are inside
    assert torch.equal(_fix("mask_seq", threshold=1.7, lower=0.5).mask, torch.tensor([[1.0] * 3, [0.0] * 3]))
    assert torch.equal(_fix("mask_seq", threshold=2.0, lower=0.8).mask, torch.tensor([[0.0] * 3, [1.0, 1.0, 0.0]]))


def test_metrics_and_staleness():
    m = off_policy_metrics(OLD, ROLLOUT, MASK, _fix("mask_token").mask, 2.0)
    sampled = [1.0, 3.0, 0.25, 1.5, 1.2]
    assert m["rollout_is_ratio_mean"] == pytest.approx(sum(sampled) / 5)
    assert m["rollout_is_ratio_max"] == pytest.approx(3.0)
    assert m["rollout_is_clipped_frac"] == pytest.approx(1 / 5)
    assert m["rollout_is_seq_ratio_max"] == pytest.approx(1.8)
    assert m["rollout_masked_frac"] == pytest.approx(2 / 5)
    assert staleness_histogram([3, 3, 2, 0], 3) == {"staleness_0": 2.0, "staleness_1": 1.0, "staleness_3": 1.0,
                                                   "staleness_max": 3.0}
    assert staleness_histogram([5, 5], 5) == {"staleness_0": 2.0, "staleness_max": 0.0}


def test_unknown_names_fail_at_config_load():
    with pytest.raises(ValueError, match="registered"):
        AlgoConfig(rollout_correction="tis")


@pytest.fixture(scope="module")
def real_batch(trainer_assets, dsec_server):
    """Four real rollouts (dsec sandboxes, the SFT policy) and the policy that sampled them."""
    torch.set_num_threads(2)
    tok = V4Tokenizer.load(trainer_assets["tokenizer"])
    model = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0)
    model.load_state_dict(torch.load(trainer_assets["sft"], weights_only=True))
    model.eval()
    batch = sorted(problems(["arithmetic", "fix_module"], "train", 2, 0) * 2, key=lambda p: p.id)
    jobs = [(f"rc-{time.time_ns()}/step-0/prompt-{i // 2}/sample-{i % 2}", p) for i, p in enumerate(batch)]
    with dsec.Client(address=dsec_server.address) as client:
        cfg = RolloutConfig(max_turns=2, max_new_tokens=40, max_total_tokens=400)
        out = run_rollouts(model, tok, client, jobs, cfg, SandboxConfig(image="python"), seed=0, policy_version=7)
    return out, model, tok


@pytest.mark.timeout(600)
def test_sampler_logprobs_are_recorded_and_match_the_learner(real_batch):
    rollouts, model, tok = real_batch
    for r in rollouts:
        assert len(r.logprobs) == len(r.ids) and r.policy_version == 7 and r.stop_reason
        assert all(lp == 0.0 for lp, m in zip(r.logprobs, r.mask) if not m)
        sampled = [lp for lp, m in zip(r.logprobs, r.mask) if m]
        assert sampled and all(lp <= 0.0 for lp in sampled)
        with torch.no_grad():
            learner_lp = token_logprobs(model, [r.ids], tok.pad_id)[0]
        recomputed = [float(learner_lp[t - 1]) for t, m in enumerate(r.mask) if m]
        assert recomputed == pytest.approx(sampled, abs=1e-4)  # same weights: on-policy up to batching numerics


def _update(model, tok, rollouts, **algo):
    learner = Learner(copy.deepcopy(model), AlgoConfig(kl_coef=0.0, **algo), 1e-3, 1.0, tok.pad_id)
    metrics = learner.update(rollouts, group_size=2)
    return metrics, learner.weights()


@pytest.mark.timeout(600)
def test_correction_off_is_bit_identical_and_metrics_appear(real_batch):
    rollouts, model, tok = real_batch
    bare = [replace(r, logprobs=[]) for r in rollouts]  # a batch as before point 2: no sampler log-probs
    on, w_on = _update(model, tok, rollouts)
    off, w_off = _update(model, tok, bare)
    assert on["loss"] == off["loss"]
    assert all(torch.equal(w_on[k], w_off[k]) for k in w_on)
    assert "rollout_is_ratio_mean" not in off
    assert on["rollout_is_ratio_mean"] == pytest.approx(1.0, abs=1e-3) and on["rollout_masked_frac"] == 0.0
    assert {"rollout_is_ratio_max", "rollout_is_clipped_frac", "rollout_is_seq_ratio_mean"} <= set(on)

    # a sampler that was off-policy: π_rollout is π_old with every sampled token's log-prob lowered by log 4
    skewed = [replace(r, logprobs=[lp - math.log(4) * m for lp, m in zip(r.logprobs, r.mask)]) for r in rollouts]
    m, _ = _update(model, tok, skewed, rollout_correction="mask_token", rollout_is_threshold=2.0)
    assert m["rollout_is_ratio_mean"] == pytest.approx(4.0, rel=1e-2) and m["rollout_masked_frac"] == 1.0
    m, _ = _update(model, tok, skewed, rollout_correction="tis_token", rollout_is_threshold=2.0)
    assert m["rollout_is_clipped_frac"] == 1.0 and m["rollout_masked_frac"] == 0.0 and math.isfinite(m["loss"])

    # truncated IS reweights the loss: rewards 0,1 per group (advantages ∓1/√2), only sample 0 skewed (weight 2)
    graded = [replace(r, reward=float(i % 2)) for i, r in enumerate(rollouts)]
    graded[0] = replace(graded[0], logprobs=skewed[0].logprobs)
    plain, _ = _update(model, tok, graded)
    assert plain["loss"] == pytest.approx(0.0, abs=1e-5)  # the group-normalised advantages cancel
    m, _ = _update(model, tok, graded, rollout_correction="tis_token", rollout_is_threshold=2.0)
    assert m["loss"] == pytest.approx((2 - 1) * (1 / math.sqrt(2)) / 4, abs=1e-4)  # -(w0·A0 + A1 + A2 + A3) / 4
    assert m["rollout_is_clipped_frac"] == pytest.approx(sum(graded[0].mask) / sum(sum(r.mask) for r in graded))
    with pytest.raises(ValueError, match="sampler's log-probs"):
        _update(model, tok, bare, rollout_correction="tis_seq")


@pytest.mark.timeout(900)
def test_a_real_grpo_step_writes_the_off_policy_and_stop_metrics(trainer_assets, dsec_server, tmp_path, ray_tmp,
                                                               make_config):
    """`python -m trainer.grpo`, one step on Ray with truncated IS on: metrics.jsonl carries the ratio metrics,
    the staleness histogram (all 0 in the synchronous loop) and the stop reasons."""
    import json

    import yaml
    from .resume_harness import finish, start_trainer

    data = make_config(tmp_path / "run").model_dump(mode="json")
    data["algo"] = {"rollout_correction": "tis_token", "kl_coef": 0.0}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(data))
    finish(start_trainer(cfg, trainer_assets, dsec_server, ray_tmp, "--max-steps", "1"), ray_tmp, 600)
    [record] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["staleness_0"] == record["samples"] == 4 and record["staleness_max"] == 0
    assert record["rollout_is_ratio_mean"] == pytest.approx(1.0, abs=1e-3)  # same weights sampled and trained
    assert record["rollout_is_clipped_frac"] == 0.0 and record["rollout_masked_frac"] == 0.0
    assert sum(record[f"stop_{r}"] for r in ("eos", "length", "tool_error", "sandbox_lost", "timeout")) == 1.0
    assert record["rollout_failures"] == 0 and record["groups_dropped"] == 0
