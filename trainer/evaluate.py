"""Held-out evaluation: rollouts (tools through dsec) on the held-out split; success = mean reward.

Sampling at the rollout temperature (V4's recommended 1.0) by default, seeded per problem, so "before" and
"after" see the same problems and the number measures the policy GRPO trains, not its argmax.
"""

from __future__ import annotations

import dsec
from tqdm import tqdm
from transformers import PreTrainedModel

from trainer.config import ExperimentConfig
from trainer.data import problems
from trainer.rollout import run_rollouts
from trainer.tokenizer import V4Tokenizer


def heldout_success(model: PreTrainedModel, tok: V4Tokenizer, client: dsec.Client, cfg: ExperimentConfig,
                    run_id: str, tag: str, batch: int = 16, greedy: bool = False, progress: bool = False
                    ) -> dict[str, float]:
    """Success rate overall and per family on `cfg.tasks.heldout_size` held-out problems (a bar if `progress`)."""
    rollout_cfg = cfg.rollout.model_copy(update={"temperature": 0.0}) if greedy else cfg.rollout
    held = problems(cfg.tasks.families, "heldout", cfg.tasks.heldout_size, cfg.tasks.seed)
    rewards: dict[str, list[float]] = {}
    solved = 0.0
    bar = tqdm(total=len(held), desc=f"eval {tag}", disable=not progress)
    for start in range(0, len(held), batch):
        jobs = [(f"{run_id}-{tag}/eval/{start + i}", p) for i, p in enumerate(held[start:start + batch])]
        for r in run_rollouts(model, tok, client, jobs, rollout_cfg, cfg.sandbox, cfg.seed):
            rewards.setdefault(r.family, []).append(r.reward)
            solved += r.reward
        bar.update(len(jobs))
        bar.set_postfix(success=f"{solved / (start + len(jobs)):.3f}")
    bar.close()
    return {"success": solved / len(held), **{f: sum(v) / len(v) for f, v in rewards.items()}}
