"""Advantage estimators, KL estimators and policy losses."""

from __future__ import annotations

import pytest
import torch

from trainer.config import AlgoConfig
from trainer.core_algos import aggregate, get_advantage, get_kl, get_policy_loss, zero_variance_groups


def test_grpo_advantage_is_group_normalised():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = get_advantage("grpo")(r, 4, 1e-6)
    assert torch.allclose(adv[:4].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(adv[:4].std(), torch.tensor(1.0), atol=1e-4)
    assert torch.all(adv[4:] == 0)
    assert torch.equal(get_advantage("dr_grpo")(r, 4, 1e-6)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert zero_variance_groups(r, 4).tolist() == [False] * 4 + [True] * 4


def test_groups_of_one_have_zero_advantage_not_nan():
    """OPD may sample one completion per prompt; a NaN advantage would poison its loss through 0 × NaN."""
    r = torch.tensor([1.0, 0.0, 1.0])
    for name in ("grpo", "dr_grpo"):
        assert torch.equal(get_advantage(name)(r, 1, 1e-6), torch.zeros(3))


def test_k3_is_nonnegative_and_zero_at_equality():
    logp = torch.randn(100)
    ref = torch.randn(100)
    assert torch.all(get_kl("k3")(logp, ref) >= 0)
    assert torch.all(get_kl("k3")(logp, logp) == 0)


def test_clipped_surrogate_clips_asymmetrically():
    loss = get_policy_loss("clipped")
    logp = torch.log(torch.tensor([[1.5]]))
    old = torch.zeros(1, 1)
    mask = torch.ones(1, 1)
    adv = torch.ones(1, 1)
    assert loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, agg="token_mean", const_len=1).item() == pytest.approx(-1.2)
    assert loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, agg="token_mean", const_len=1).item() == pytest.approx(-1.28)


def test_aggregations_differ_as_documented():
    v = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(v, m, "token_mean", 4).item() == pytest.approx(5 / 3)
    assert aggregate(v, m, "seq_mean_token_mean", 4).item() == pytest.approx(2.0)
    assert aggregate(v, m, "seq_mean_token_sum_norm", 4).item() == pytest.approx((2 / 4 + 3 / 4) / 2)


def test_presets_and_unknown_names():
    assert AlgoConfig.preset("dapo").clip_high == 0.28 and AlgoConfig.preset("dapo").drop_zero_variance
    with pytest.raises(ValueError, match="registered"):
        get_advantage("nope")
    with pytest.raises(ValueError):
        AlgoConfig.preset("nope")


def test_reward_runs_refuse_groups_of_one_at_load_time():
    """GRPO with one sample a prompt has no baseline (every advantage 0): refused, not silently a no-op run."""
    from trainer.config import ExperimentConfig

    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        ExperimentConfig.model_validate({"grpo": {"group_size": 1}})
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        ExperimentConfig.model_validate({"grpo": {"group_size": 1}, "algo": {"opd": {"reward_weight": 0.5}}})
    with pytest.raises(ValueError, match="unknown algorithm preset"):
        ExperimentConfig.model_validate({"algo_preset": "nope"})
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        ExperimentConfig.model_validate({"grpo": {"prompts_per_step": 0}})
    pure_opd = ExperimentConfig.model_validate({"grpo": {"group_size": 1}, "algo_preset": "opd"})
    assert pure_opd.grpo.group_size == 1 and pure_opd.algorithm().opd.reward_weight == 0.0
