"""`grpo.freeze`: the learner's updates leave the named parameters bit-identical and move the others."""

from __future__ import annotations

import pytest
import torch

from trainer.config import AlgoConfig, ExperimentConfig
from trainer.data import demo_pieces, problems, tokenize_pieces
from trainer.learner import Learner
from trainer.policy import build_policy
from trainer.rollout import Rollout
from trainer.teachers import load_weights
from trainer.tokenizer import V4Tokenizer


def _policy_and_batch(assets):
    tok = V4Tokenizer.load(assets["tokenizer"])
    model = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0)
    model.load_state_dict(load_weights(assets["sft"]))
    rollouts = []
    for i, p in enumerate(problems(["arithmetic", "fix_module"], "train", 4, 0)):
        ids, mask = tokenize_pieces(tok, demo_pieces(p, "non-think"))
        rollouts.append(Rollout(f"t/step-0/prompt-{i // 2}/sample-{i % 2}", p.id, p.family, ids, mask,
                                reward=float(i % 2)))
    return tok, model.eval(), rollouts


def test_frozen_parameters_stay_bit_identical_and_the_rest_move(trainer_assets):
    tok, model, rollouts = _policy_and_batch(trainer_assets)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = Learner(model, AlgoConfig.preset("dapo"), 1e-3, 1.0, tok.pad_id, freeze=["embed_tokens", "self_attn"])
    metrics = learner.update(rollouts, group_size=2)
    assert metrics["kept_samples"] == 4
    after = model.state_dict()
    frozen = [k for k in before if "embed_tokens" in k or "self_attn" in k]
    trained = [k for k in before if k not in frozen and before[k].is_floating_point()]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)


def test_freezing_everything_is_a_clear_error(trainer_assets):
    tok, model, _ = _policy_and_batch(trainer_assets)
    with pytest.raises(ValueError, match="leaves no parameter"):
        Learner(model, AlgoConfig.preset("dapo"), 1e-3, 1.0, tok.pad_id, freeze=["model", "lm_head"])


def test_freeze_is_part_of_the_experiment_config():
    cfg = ExperimentConfig.model_validate({"grpo": {"freeze": ["self_attn"]}})
    assert cfg.grpo.freeze == ["self_attn"]
