"""OPD's token adjustments, the learner's OPD update and the teachers' scoring, on real tiny V4 policies."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from trainer.config import AlgoConfig, OPDConfig
from trainer.core_algos import get_token_adjustment
from trainer.data import demo_pieces, problems, tokenize_pieces
from trainer.grpo import init_ray
from trainer.learner import Learner
from trainer.policy import build_policy
from trainer.rollout import Rollout
from trainer.sampler import token_logprobs
from trainer.teachers import load_weights, score, score_rollouts, start_teachers
from trainer.tokenizer import V4Tokenizer

KW = dict(agg="token_mean", const_len=1)


def test_sampled_token_advantage_is_reward_term_minus_scaled_log_ratio():
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    logp = torch.tensor([[-9.0, -1.0, -2.0], [-0.5, -9.0, -9.0]])
    teacher = torch.tensor([-1.5, -1.0, -0.5])  # at the 3 masked positions, row-major
    adv_tok = torch.tensor([[1.0] * 3, [-1.0] * 3])
    adv, extra, kl = get_token_adjustment("sampled_token")(adv_tok, logp, None, teacher, mask, reward_weight=0.5,
                                                           coef=2.0, **KW)
    assert torch.allclose(kl, torch.tensor([[0.0, 0.5, -1.0], [0.0, 0.0, 0.0]]))
    assert torch.allclose(adv[mask.bool()], torch.tensor([0.5 - 1.0, 0.5 + 2.0, -0.5 - 0.0]))
    assert extra.item() == 0.0


def test_full_vocab_kl_is_exact_nonnegative_and_its_gradient_is_the_sampled_estimators_expectation():
    torch.manual_seed(0)
    student_logits = torch.randn(1, 1, 7, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(1, 7), -1)
    mask = torch.ones(1, 1)
    full = torch.log_softmax(student_logits, -1)
    _, loss, kl = get_token_adjustment("full_vocab")(torch.zeros(1, 1), full[..., 0], full, teacher, mask,
                                                     reward_weight=0.0, coef=1.0, **KW)
    p, q = full.detach().exp()[0, 0], teacher.exp()[0]
    assert kl.item() == pytest.approx(float((p * (p.log() - q.log())).sum()), abs=1e-6) and kl.item() > 0
    (grad_full,) = torch.autograd.grad(loss, student_logits)
    # E_{a~π_s}[∇log π_s(a) · (log π_s(a) − log π_t(a))], summed exactly over the vocabulary
    expected = torch.zeros(7)
    for a in range(7):
        logits = student_logits.detach().clone().requires_grad_(True)
        lp = torch.log_softmax(logits, -1)[0, 0, a]
        (g,) = torch.autograd.grad(lp, logits)
        expected += p[a] * g[0, 0] * (lp.detach() - teacher[0, a])
    assert torch.allclose(grad_full[0, 0], expected, atol=1e-6)
    same, _, _ = get_token_adjustment("full_vocab")(torch.zeros(1, 1), full[..., 0], full, full[0].detach(), mask,
                                                    reward_weight=0.0, coef=1.0, **KW)
    assert torch.all(same == 0)


@pytest.fixture(scope="module")
def tiny(trainer_assets):
    torch.set_num_threads(2)
    tok = V4Tokenizer.load(trainer_assets["tokenizer"])
    student = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0)
    student.load_state_dict(load_weights(trainer_assets["sft"]))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for prm in teacher.parameters():
            prm.add_(0.05 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(1)))
    rollouts = []
    for i, p in enumerate(problems(["arithmetic", "fix_module"], "train", 4, 0)):
        ids, mask = tokenize_pieces(tok, demo_pieces(p, "non-think"))
        rollouts.append(Rollout(f"t/step-0/prompt-{i}/sample-0", p.id, p.family, ids, mask, reward=float(i % 2)))
    return tok, student.eval(), teacher.eval(), rollouts


def test_teacher_scores_are_its_log_probs_at_sampled_positions_only(tiny):
    tok, _, teacher, rollouts = tiny
    seqs, masks = [r.ids for r in rollouts], [r.mask for r in rollouts]
    sampled = score(teacher, seqs, masks, tok.pad_id, full_vocab=False, chunk=3)
    full = score(teacher, seqs, masks, tok.pad_id, full_vocab=True)
    with torch.no_grad():
        reference = token_logprobs(teacher, seqs, tok.pad_id)
    for i, r in enumerate(rollouts):
        picked = torch.tensor(r.mask[1:], dtype=torch.bool)
        assert sampled[i].shape == (int(picked.sum()),) and full[i].shape == (int(picked.sum()), tok.vocab_size)
        assert torch.allclose(sampled[i], reference[i, : len(r.ids) - 1][picked], atol=1e-5)
        next_ids = torch.tensor(r.ids[1:])[picked]
        assert torch.allclose(full[i].gather(-1, next_ids.unsqueeze(-1)).squeeze(-1), sampled[i], atol=1e-5)


@pytest.mark.parametrize("estimator", ["full_vocab", "sampled_token"])
def test_opd_updates_pull_the_student_toward_the_teacher(tiny, estimator):
    tok, student, teacher, rollouts = tiny
    algo = AlgoConfig(kl_coef=0.0, loss_agg="token_mean", opd=OPDConfig(kl_estimator=estimator))
    learner = Learner(copy.deepcopy(student), algo, lr=3e-3, grad_clip=1.0, pad_id=tok.pad_id)
    seqs, masks = [r.ids for r in rollouts], [r.mask for r in rollouts]
    scores = score(teacher, seqs, masks, tok.pad_id, full_vocab=estimator == "full_vocab")
    exact = score(teacher, seqs, masks, tok.pad_id, full_vocab=True)

    def reverse_kl() -> float:
        mine = score(learner.model, seqs, masks, tok.pad_id, full_vocab=True)
        return float(sum((s.exp() * (s - t)).sum() for s, t in zip(mine, exact)))

    before = reverse_kl()
    metrics = [learner.update(rollouts, group_size=2, teacher=scores) for _ in range(8)]
    after = reverse_kl()
    assert after < 0.8 * before, (before, after)
    assert "opd_kl" in metrics[0]
    with pytest.raises(ValueError, match="teacher scores"):
        learner.update(rollouts, group_size=2)
    with pytest.raises(ValueError, match="mask=1 positions"):
        learner.update(rollouts, group_size=2, teacher=[s[:-1] for s in scores])


def test_teachers_must_cover_every_family(tmp_path, make_config, trainer_assets):
    cfg = make_config(tmp_path).model_copy(update={"algo": AlgoConfig(kl_coef=0.0, opd=OPDConfig(
        teachers={"arithmetic": trainer_assets["sft"]}))})
    with pytest.raises(ValueError, match=r"no teacher for task families \['fix_module'\]"):
        start_teachers(cfg, trainer_assets["tokenizer"])
    cfg.algo.opd.teachers["fix_module"] = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        start_teachers(cfg, trainer_assets["tokenizer"])
    with pytest.raises(ValueError, match="has no teacher"):
        score_rollouts({}, [{"trajectory_id": "r/1", "family": "arithmetic", "ids": [1], "mask": [0]}],
                       cfg.algo.opd)


def test_opd_keeps_groups_with_equal_rewards(tiny):
    """DAPO drops zero-variance groups (no reward signal); under OPD they still carry the teachers' signal."""
    tok, student, teacher, rollouts = tiny
    flat = [dataclasses.replace(r, reward=0.0) for r in rollouts]
    algo = AlgoConfig.preset("dapo").model_copy(update={"opd": OPDConfig(kl_estimator="sampled_token")})
    learner = Learner(copy.deepcopy(student), algo, lr=1e-3, grad_clip=1.0, pad_id=tok.pad_id)
    scores = score(teacher, [r.ids for r in flat], [r.mask for r in flat], tok.pad_id, full_vocab=False)
    assert learner.update(flat, group_size=2, teacher=scores)["kept_samples"] == len(flat)


def test_each_rollout_is_scored_by_its_familys_teacher_actor(tmp_path, make_config, trainer_assets, teacher_weights,
                                                           ray_tmp):
    """Two distinct teachers as real Ray actors, rollouts of both families interleaved: every rollout's scores
    are its own family's teacher's log-probs, in the rollouts' order (a swap would pass a shape check)."""
    import ray

    tok = V4Tokenizer.load(trainer_assets["tokenizer"])
    models = {}
    for family, path in teacher_weights.items():
        models[family] = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0)
        models[family].load_state_dict(load_weights(path))
        models[family].eval()
    cfg = make_config(tmp_path).model_copy(update={"algo": AlgoConfig(kl_coef=0.0, opd=OPDConfig(
        teachers=teacher_weights, kl_estimator="sampled_token"))})
    gen = torch.Generator().manual_seed(0)
    rollouts = []
    for i, family in enumerate(["arithmetic", "fix_module", "fix_module", "arithmetic", "fix_module"]):
        ids = torch.randint(5, tok.vocab_size, (12 + i,), generator=gen).tolist()
        rollouts.append({"trajectory_id": f"r/{i}", "family": family, "ids": ids, "mask": [0] * 4 + [1] * (8 + i)})
    init_ray(None, num_cpus=1, temp_dir=str(ray_tmp))  # retried: a loaded machine can miss Ray's 30 s start window
    try:
        got = score_rollouts(start_teachers(cfg, trainer_assets["tokenizer"]), rollouts, cfg.algo.opd)
    finally:
        ray.shutdown()
    for r, scores in zip(rollouts, got):
        own = score(models[r["family"]], [r["ids"]], [r["mask"]], tok.pad_id, full_vocab=False)[0]
        other = "fix_module" if r["family"] == "arithmetic" else "arithmetic"
        theirs = score(models[other], [r["ids"]], [r["mask"]], tok.pad_id, full_vocab=False)[0]
        assert scores.shape == (sum(r["mask"][1:]),)
        assert torch.allclose(scores, own, atol=1e-5) and not torch.allclose(scores, theirs, atol=1e-3)
