"""Failure isolation at the group level: one rollout whose sandbox was lost must not sink its step.

Why a module of its own: the rollout loop decides *that* a rollout failed (after its retries, trainer.rollout);
this decides what its group becomes in the loss, and counts why rollouts stopped, so error rates show up in
metrics.jsonl next to the loss they did not break.
"""

from __future__ import annotations

from typing import Literal

from trainer.rollout import STOP_REASONS, Rollout


def stop_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    """`stop_<reason>`: the share of rollouts that ended for each reason; `rollout_failures` (sandbox lost or
    timed out on every try), `rollout_retries` (fresh sandboxes beyond the first), `sandbox_error_rate`."""
    n = max(len(rollouts), 1)
    out = {f"stop_{reason}": sum(r.stop_reason == reason for r in rollouts) / n for reason in STOP_REASONS}
    failures = sum(r.failed for r in rollouts)
    out.update(rollout_failures=float(failures), sandbox_error_rate=failures / n,
               rollout_retries=float(sum(r.attempts - 1 for r in rollouts)))
    return out


def isolate_groups(rollouts: list[Rollout], group_size: int, policy: Literal["drop", "fill"]
                   ) -> tuple[list[int], dict[str, float]]:
    """Which rollouts to train on, as indices into `rollouts` (so per-rollout side data, e.g. OPD teacher scores,
    follows): groups (consecutive `group_size` rollouts) without a failed rollout as they are; a group with one is
    dropped, or with "fill" has each failed sample replaced by a surviving one of its group (cycling through them;
    a group where none survived is dropped)."""
    if len(rollouts) % group_size:
        raise ValueError(f"{len(rollouts)} rollouts do not split into groups of {group_size}")
    kept: list[int] = []
    dropped = filled = 0
    for start in range(0, len(rollouts), group_size):
        group = range(start, start + group_size)
        alive = [i for i in group if not rollouts[i].failed]
        if len(alive) == group_size:
            kept += group
        elif policy == "fill" and alive:
            copies = iter(alive * group_size)
            kept += [i if not rollouts[i].failed else next(copies) for i in group]
            filled += 1
        else:
            dropped += 1
    return kept, {"groups_dropped": float(dropped), "groups_filled": float(filled)}
