"""Advantage estimators, policy losses and KL estimators, in registries selected by config name (verl style).

On-policy distillation is a token-level adjustment (`TOKEN_ADJUSTMENTS`, keyed by KL estimator name): it turns
the teachers' log-probs into per-token advantages and/or an extra loss term, and reuses the same policy losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

AdvantageFn = Callable[[torch.Tensor, int, float], torch.Tensor]
LossFn = Callable[..., torch.Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}
POLICY_LOSSES: dict[str, LossFn] = {}
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
TOKEN_ADJUSTMENTS: dict[str, Callable[..., torch.Tensor]] = {}


def _register(table: dict[str, Any], name: str) -> Callable[[Any], Any]:
    def deco(fn: Any) -> Any:
        if name in table:
            raise ValueError(f"{name!r} is already registered")
        table[name] = fn
        return fn

    return deco


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    return _register(ADVANTAGES, name)


def register_policy_loss(name: str) -> Callable[[LossFn], LossFn]:
    return _register(POLICY_LOSSES, name)


def register_token_adjustment(name: str) -> Callable[[Any], Any]:
    return _register(TOKEN_ADJUSTMENTS, name)


def _lookup(table: dict[str, Any], name: str, what: str) -> Any:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; registered: {sorted(table)}")
    return table[name]


def get_advantage(name: str) -> AdvantageFn:
    return _lookup(ADVANTAGES, name, "advantage estimator")


def get_policy_loss(name: str) -> LossFn:
    return _lookup(POLICY_LOSSES, name, "policy loss")


def get_token_adjustment(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return _lookup(TOKEN_ADJUSTMENTS, name, "token adjustment")


def get_kl(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return _lookup(KL_ESTIMATORS, name, "KL estimator")


@register_advantage("grpo")
def grpo_advantage(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """DeepSeekMath: (r - mean) / (std + eps) within each group of consecutive `group_size` samples.

    A group of one has no baseline: its advantage is 0 (not the NaN of a one-sample std, which would poison an
    OPD batch whose reward weight is 0 through 0 × NaN).
    """
    r = rewards.view(-1, group_size)
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    return ((r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)).view(-1)


@register_advantage("dr_grpo")
def dr_grpo_advantage(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Dr. GRPO: no std division (it over-weights easy/hard groups)."""
    r = rewards.view(-1, group_size)
    return (r - r.mean(dim=1, keepdim=True)).view(-1)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-sample bool: True where the sample's group has equal rewards (DAPO drops these: no signal)."""
    r = rewards.view(-1, group_size)
    return (r.max(dim=1).values == r.min(dim=1).values).repeat_interleave(group_size)


@_register(KL_ESTIMATORS, "k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


@_register(KL_ESTIMATORS, "k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


@_register(KL_ESTIMATORS, "k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's unbiased, always-positive estimator: r - log r - 1 with r = pi_ref / pi."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, const_len: int) -> torch.Tensor:
    """Reduce per-token values to a scalar.

    seq_mean_token_mean: GRPO (each sequence weighs the same); token_mean: DAPO (each token weighs the same);
    seq_mean_token_sum_norm: Dr. GRPO (token sums over a constant length, no length bias).
    """
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        return (values * mask).sum() / mask.sum().clamp(min=1)
    if mode == "seq_mean_token_mean":
        per_seq = (values * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.mean()
    if mode == "seq_mean_token_sum_norm":
        return ((values * mask).sum(1) / const_len).mean()
    raise ValueError(f"unknown loss aggregation {mode!r}")


@register_policy_loss("clipped")
def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    agg: str,
    const_len: int,
) -> torch.Tensor:
    """PPO/GRPO clipped surrogate, asymmetric clip (DAPO clip-higher when clip_high > clip_low)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    return aggregate(-torch.minimum(unclipped, clipped), mask, agg, const_len)


@register_policy_loss("gspo")
def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    agg: str,
    const_len: int,
) -> torch.Tensor:
    """GSPO: one length-normalised sequence-level ratio per sample, clipped like PPO."""
    m = mask.to(logp.dtype)
    seq_log_ratio = ((logp - old_logp) * m).sum(1) / m.sum(1).clamp(min=1)
    ratio = torch.exp(seq_log_ratio)
    adv = advantages[:, 0]
    loss = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    return loss.mean()


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-masked-token values (row-major order of `mask`) back into a [B, T] tensor, zeros elsewhere."""
    return torch.zeros(mask.shape, dtype=values.dtype).masked_scatter(mask.bool(), values)


@register_token_adjustment("sampled_token")
def opd_sampled_token(
    adv_tok: torch.Tensor,
    logp: torch.Tensor,
    full_logp: torch.Tensor | None,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    *,
    reward_weight: float,
    coef: float,
    agg: str,
    const_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advantage w·A − λ·(log π_s − log π_t) at each sampled token: a one-sample reverse KL (tinker-cookbook).

    `teacher`: teacher log-probs of the sampled tokens at the masked positions, shape [N]. Returns (advantages,
    extra loss = 0, per-token KL estimate for logging).
    """
    kl_tok = (logp.detach() - _scatter(teacher, mask)) * mask
    return reward_weight * adv_tok - coef * kl_tok, torch.zeros(()), kl_tok


@register_token_adjustment("full_vocab")
def opd_full_vocab(
    adv_tok: torch.Tensor,
    logp: torch.Tensor,
    full_logp: torch.Tensor | None,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    *,
    reward_weight: float,
    coef: float,
    agg: str,
    const_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact reverse KL(π_s‖π_t) summed over the vocabulary at each sampled position, as a differentiable loss.

    Its gradient is the expectation of the sampled-token estimator's at that position, without its variance
    (DeepSeek-V4's full-vocabulary distillation). `teacher`: teacher log-probs over the vocabulary at the masked
    positions, [N, V]; `full_logp`: the student's, [B, T, V], with gradient. The reward term stays an advantage.
    """
    if full_logp is None:
        raise ValueError("full_vocab OPD needs the student's full-vocabulary log-probs")
    student = full_logp[mask.bool()]
    kl_pos = (student.exp() * (student - teacher)).sum(-1)
    kl_tok = _scatter(kl_pos, mask)
    return reward_weight * adv_tok, coef * aggregate(kl_tok, mask, agg, const_len), kl_tok.detach()


# -- rollout correction ---------------------------------------------------------------------------------------
# The sampler's policy (π_rollout: older weights once rollouts are asynchronous, or another engine's numerics) is
# not the learner's π_old. A correction compares the two on the sampled tokens and reweights or masks them
# before the policy loss (verl's rollout_is). Each entry maps (log π_old, log π_rollout, mask, threshold, lower)
# to per-token weights (None: unweighted) and the mask to train on.

@dataclass
class Correction:
    weights: torch.Tensor | None  # [B, T] detached multipliers of the advantages; None leaves them alone
    mask: torch.Tensor  # [B, T] the tokens kept in the loss


CorrectionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], Correction]
ROLLOUT_CORRECTIONS: dict[str, CorrectionFn] = {}


def register_rollout_correction(name: str) -> Callable[[CorrectionFn], CorrectionFn]:
    return _register(ROLLOUT_CORRECTIONS, name)


def get_rollout_correction(name: str) -> CorrectionFn:
    return _lookup(ROLLOUT_CORRECTIONS, name, "rollout correction")


def _seq_log_ratio(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log of the sequence-level ratio Π_t π_old/π_rollout over the sampled tokens, [B]."""
    return ((old_logp - rollout_logp) * mask).sum(1)


@register_rollout_correction("none")
def no_correction(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, threshold: float,
                  lower: float) -> Correction:
    """Train on the samples as if on-policy (the synchronous loop's default: the loss is unchanged)."""
    return Correction(None, mask)


@register_rollout_correction("tis_token")
def tis_token(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, threshold: float,
              lower: float) -> Correction:
    """Truncated IS per token: w_t = min(π_old/π_rollout, threshold) (bounded variance, small bias)."""
    ratio = torch.exp(old_logp - rollout_logp).detach()
    return Correction(torch.clamp(ratio, max=threshold) * mask, mask)


@register_rollout_correction("tis_seq")
def tis_seq(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, threshold: float,
            lower: float) -> Correction:
    """Truncated IS per sequence: every token of a sample weighs min(Π_t π_old/π_rollout, threshold)."""
    log_ratio = _seq_log_ratio(old_logp, rollout_logp, mask).detach()
    weight = torch.exp(torch.clamp(log_ratio, max=math.log(threshold)))
    return Correction(weight.unsqueeze(1) * mask, mask)


@register_rollout_correction("mask_token")
def mask_token(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, threshold: float,
               lower: float) -> Correction:
    """Rejection per token: a token whose ratio lies outside [lower, threshold] leaves the loss."""
    ratio = torch.exp(old_logp - rollout_logp).detach()
    return Correction(None, mask * ((ratio >= lower) & (ratio <= threshold)).to(mask.dtype))


@register_rollout_correction("mask_seq")
def mask_seq(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, threshold: float,
             lower: float) -> Correction:
    """Rejection per sample: a sample whose sequence ratio lies outside [lower, threshold] leaves the loss."""
    log_ratio = _seq_log_ratio(old_logp, rollout_logp, mask).detach()
    inside = (log_ratio >= math.log(lower)) & (log_ratio <= math.log(threshold))
    return Correction(None, mask * inside.unsqueeze(1).to(mask.dtype))


def off_policy_metrics(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                       corrected: torch.Tensor, threshold: float) -> dict[str, float]:
    """How far the sampler was from π_old on this batch, whatever the correction (logging only, no gradient).

    `rollout_is_*`: the per-token ratio π_old/π_rollout (mean, max over sampled tokens; fraction above the
    threshold, i.e. truncated by tis_token); `rollout_is_seq_*`: the sequence ratio; `rollout_masked_frac`: the
    share of sampled tokens the correction removed from the loss.
    """
    with torch.no_grad():
        m = mask.bool()
        n = int(m.sum())
        if n == 0:
            return {}
        ratio = torch.exp(old_logp - rollout_logp)[m]
        seq = torch.exp(_seq_log_ratio(old_logp, rollout_logp, mask))[m.any(1)]
        return {
            "rollout_is_ratio_mean": ratio.mean().item(),
            "rollout_is_ratio_max": ratio.max().item(),
            "rollout_is_clipped_frac": (ratio > threshold).float().mean().item(),
            "rollout_is_seq_ratio_mean": seq.mean().item(),
            "rollout_is_seq_ratio_max": seq.max().item(),
            "rollout_masked_frac": 1.0 - float(corrected.sum()) / n,
            "rollout_logp_abs_diff": (old_logp - rollout_logp)[m].abs().mean().item(),
        }


def staleness_histogram(sample_versions: list[int], learner_version: int) -> dict[str, float]:
    """`staleness_<k>`: how many samples came from the policy k updates before the one being trained
    (all at 0 in the synchronous loop; `staleness_max` too)."""
    ages = [learner_version - v for v in sample_versions]
    hist = {f"staleness_{k}": float(ages.count(k)) for k in sorted(set(ages))}
    return {**hist, "staleness_max": float(max(ages, default=0))}
