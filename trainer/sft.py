"""SFT warm start on generated correct demonstrations, so a tiny random policy learns the V4/DSML format first."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from trainer.config import SFTConfig
from trainer.sampler import right_pad


def masked_nll(model: PreTrainedModel, ids: list[list[int]], masks: list[list[int]], pad_id: int) -> torch.Tensor:
    """Mean negative log-likelihood of the masked (assistant-output) tokens."""
    batch = right_pad(ids, pad_id)
    mask = right_pad(masks, 0)[:, 1:].float()
    logits = model(input_ids=batch).logits.float()[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def train_sft(
    model: PreTrainedModel,
    examples: list[tuple[list[int], list[int]]],
    cfg: SFTConfig,
    pad_id: int,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW over random minibatches of (ids, mask); returns the loss per step."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / cfg.steps))
    model.train()
    losses = []
    for step in range(cfg.steps):
        batch = rng.sample(examples, min(cfg.batch_size, len(examples)))
        loss = masked_nll(model, [b[0] for b in batch], [b[1] for b in batch], pad_id)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
