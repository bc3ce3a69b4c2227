"""The learner: policy, frozen reference, optimizer, and one GRPO update from a batch of rollouts.

Losses and advantages come from the `core_algos` registries by config name, so variants (Dr. GRPO, DAPO,
GSPO, and on-policy distillation's token-level adjustment from teacher log-probs) are configuration, not new
trainers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from trainer import tito
from trainer.config import AlgoConfig
from trainer.core_algos import (
    get_advantage,
    get_kl,
    get_policy_loss,
    get_rollout_correction,
    get_token_adjustment,
    off_policy_metrics,
    zero_variance_groups,
)
from trainer.failures import isolate_groups, stop_metrics
from trainer.rollout import Rollout
from trainer.sampler import right_pad, token_logprobs


class Learner:
    def __init__(self, model: PreTrainedModel, algo: AlgoConfig, lr: float, grad_clip: float, pad_id: int,
                 freeze: Sequence[str] = ()) -> None:
        """`freeze`: parameter-name substrings the updates leave unchanged (see `GRPOConfig.freeze`)."""
        self.model = model
        self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.algo = algo
        self.grad_clip = grad_clip
        self.pad_id = pad_id
        for name, param in model.named_parameters():
            param.requires_grad_(not any(part in name for part in freeze))
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"freeze={list(freeze)} leaves no parameter to train")
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def update(self, rollouts: list[Rollout], group_size: int, updates: int = 1,
               teacher: list[torch.Tensor] | None = None) -> dict[str, float]:
        """Group-normalised advantages → clipped surrogate + β·KL(ref), `updates` optimizer steps on the batch.

        With `algo.opd`, `teacher` holds per rollout the teacher's log-probs at its sampled (mask=1) positions
        ([n] for the sampled-token estimator, [n, V] for full-vocab), and the OPD token adjustment reshapes the
        advantages (and adds its loss term) before the same policy loss.
        """
        a = self.algo
        if a.opd is not None and (teacher is None or len(teacher) != len(rollouts)):
            raise ValueError(f"OPD needs teacher scores for each of the {len(rollouts)} rollouts "
                             f"(got {None if teacher is None else len(teacher)}): start the trainer with teachers")
        failure_metrics = {**stop_metrics(rollouts), "reward_mean": _mean([r.reward for r in rollouts])}
        kept_idx, isolated = isolate_groups(rollouts, group_size, a.on_group_failure)
        rollouts = [rollouts[i] for i in kept_idx]
        teacher = None if teacher is None else [teacher[i] for i in kept_idx]
        failure_metrics.update(isolated)
        if not rollouts:  # every group lost a rollout: the step goes on, training on nothing
            return {**failure_metrics, "kept_samples": 0.0, "loss": 0.0, "kl": 0.0, "tito_violations": 0.0,
                    "tito_unchecked": 0.0}
        drift = tito.check((r.trajectory_id, r.ids, r.mask, r.sampled_hash) for r in rollouts)
        if drift.violations and a.tito_check == "refuse":
            raise tito.TitoViolation(f"{len(drift.violations)} of {len(rollouts)} samples break token-in/token-out: "
                                     + "; ".join(drift.violations[:3])
                                     + " (the step trains on nothing; algo.tito_check: drop leaves them out instead)")
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
        adv = get_advantage(a.advantage)(rewards, group_size, 1e-6)
        keep = ~torch.tensor(drift.drifted, dtype=torch.bool)
        if a.drop_zero_variance and a.opd is None:  # with OPD, equal rewards still carry the teachers' signal
            keep &= ~zero_variance_groups(rewards, group_size)
        if a.overlong_filter:  # cut by a budget: its reward 0 says nothing about the answer it never gave
            keep &= torch.tensor([r.stop_reason != "length" for r in rollouts], dtype=torch.bool)
        metrics = {**failure_metrics, "kept_samples": float(keep.sum()), "loss": 0.0, "kl": 0.0,
                   "tito_violations": float(len(drift.violations)), "tito_unchecked": float(drift.unchecked)}
        if not keep.any():
            return metrics
        batch = [r for r, k in zip(rollouts, keep.tolist()) if k]
        seqs = [r.ids for r in batch]
        mask = right_pad([r.mask for r in batch], 0)[:, 1:].float()
        adv_tok = adv[keep].unsqueeze(1).expand_as(mask)
        opd = a.opd
        full = opd is not None and opd.kl_estimator == "full_vocab"
        if opd is not None:
            metrics["opd_kl"] = 0.0
            teacher_tok = torch.cat([t for t, k in zip(teacher, keep.tolist()) if k]).float()
            if teacher_tok.shape[0] != int(mask.sum()):
                raise ValueError(f"teacher scores cover {teacher_tok.shape[0]} tokens, the batch samples "
                                 f"{int(mask.sum())}: score exactly the mask=1 positions of each rollout")
        with torch.no_grad():
            # With one update per batch the policy is the sampler: ratio = 1, so old log-probs are the current
            # ones, detached (saves a forward pass).
            old_logp = token_logprobs(self.model, seqs, self.pad_id) if updates > 1 else None
            ref_logp = token_logprobs(self.ref, seqs, self.pad_id) if a.kl_coef > 0 else None
        loss_fn = get_policy_loss(a.policy_loss)
        rollout_logp = _rollout_logprobs(batch, a.rollout_correction)
        for update in range(updates):
            self.model.train()
            logp, full_logp = _logprobs(self.model, seqs, self.pad_id, full)
            if update == 0 and rollout_logp is not None:
                # π_old: before the first optimizer step of the batch the policy being trained is π_old
                mask, adv_tok = self._correct(logp.detach() if old_logp is None else old_logp, rollout_logp, mask,
                                              adv_tok, metrics)
            step_adv, extra = adv_tok, None
            if opd is not None:
                step_adv, extra, kl_tok = get_token_adjustment(opd.kl_estimator)(
                    adv_tok, logp, full_logp, teacher_tok, mask, reward_weight=opd.reward_weight, coef=opd.coef,
                    agg=a.loss_agg, const_len=a.const_len)
                metrics["opd_kl"] = ((kl_tok * mask).sum() / mask.sum().clamp(min=1)).item()
            loss = loss_fn(logp, logp.detach() if old_logp is None else old_logp, step_adv, mask, clip_low=a.clip_low,
                           clip_high=a.clip_high, agg=a.loss_agg, const_len=a.const_len)
            if extra is not None:
                loss = loss + extra
            if ref_logp is not None:
                kl = (get_kl(a.kl_estimator)(logp, ref_logp) * mask).sum() / mask.sum().clamp(min=1)
                loss = loss + a.kl_coef * kl
                metrics["kl"] = kl.item()
            self.opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.opt.step()
            metrics["loss"] = loss.item()
        self.model.eval()
        metrics["tokens"] = float(mask.sum())
        return metrics

    def _correct(self, old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, adv_tok: torch.Tensor,
                 metrics: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rollout correction (`algo.rollout_correction`) applied to the mask and the advantages, and the
        off-policy metrics; "none" returns both tensors untouched (the loss is bit-identical to no correction)."""
        a = self.algo
        lower = a.rollout_is_threshold_lower or 1.0 / a.rollout_is_threshold
        fix = get_rollout_correction(a.rollout_correction)(old_logp, rollout_logp, mask, a.rollout_is_threshold, lower)
        metrics.update(off_policy_metrics(old_logp, rollout_logp, mask, fix.mask, a.rollout_is_threshold))
        return fix.mask, adv_tok if fix.weights is None else adv_tok * fix.weights

    def payload(self) -> dict[str, object]:
        """What a checkpoint needs of the learner (trainer.checkpoint writes it with the run's step and cursor)."""
        return {"model": self.model.state_dict(), "ref": self.ref.state_dict(), "opt": self.opt.state_dict(),
                "torch_rng": torch.get_rng_state()}

    def restore(self, payload: dict[str, object]) -> None:
        self.model.load_state_dict(payload["model"])
        self.ref.load_state_dict(payload["ref"])
        self.opt.load_state_dict(payload["opt"])
        torch.set_rng_state(payload["torch_rng"])


def _mean(values: list[float]) -> float:
    return torch.tensor(values, dtype=torch.float32).mean().item() if values else 0.0


def _rollout_logprobs(batch: list[Rollout], correction: str) -> torch.Tensor | None:
    """The sampler's log-probs aligned with `token_logprobs` ([B, T-1]); None when a rollout did not record them
    (built outside the sampler), which only a correction other than "none" refuses."""
    if all(len(r.logprobs) == len(r.ids) for r in batch):
        return right_pad_float([r.logprobs for r in batch])[:, 1:]
    if correction != "none":
        missing = next(r.trajectory_id for r in batch if len(r.logprobs) != len(r.ids))
        raise ValueError(f"algo.rollout_correction={correction!r} needs the sampler's log-probs, and rollout "
                         f"{missing!r} has none recorded (sample it with trainer.rollout, or use 'none')")
    return None


def right_pad_float(rows: list[list[float]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def _logprobs(model: PreTrainedModel, seqs: list[list[int]], pad_id: int, full: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sampled-token log-probs [B, T-1], plus the full-vocabulary ones [B, T-1, V] when `full` (one forward)."""
    if not full:
        return token_logprobs(model, seqs, pad_id), None
    batch = right_pad(seqs, pad_id)
    full_logp = torch.log_softmax(model(input_ids=batch).logits.float()[:, :-1], dim=-1)
    return full_logp.gather(-1, batch[:, 1:].unsqueeze(-1)).squeeze(-1), full_logp
