"""The token-in/token-out invariant, checked: the ids a step trains on are exactly the ids the policy sampled.

Why: multi-turn drift (a prompt or tool result re-tokenised differently, a mask shifted by one, a tool result
marked trainable) trains the policy on tokens it never produced, silently. The sampler side folds every sampled
id into a rolling hash as it appends it (`extend`); the learner recomputes that hash over the ids it is about
to train on (mask = 1) and checks that the prompt is masked. Both sides are O(tokens) integer arithmetic, so
the check runs on every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_MOD = (1 << 61) - 1  # a Mersenne prime: the hash stays a Python int that JSON and Ray carry exactly
_BASE = 1_000_003
EMPTY = 1  # the hash of no sampled ids


class TitoViolation(ValueError):
    """Trained-on ids differ from sampled ids. The message names the trajectory and what differs."""


def extend(digest: int | None, ids: Iterable[int]) -> int:
    """Fold `ids` (in order) into the rolling hash of the ids sampled so far (`None` = nothing yet)."""
    h = EMPTY if digest is None else digest
    for token in ids:
        h = (h * _BASE + token + 1) % _MOD
    return h


@dataclass
class TitoReport:
    reasons: list[str | None]  # per sample: why it breaks the invariant, or None
    unchecked: int = 0  # samples without a sampled-ids hash (built outside a rollout): judged on the mask only

    @property
    def violations(self) -> list[str]:
        return [r for r in self.reasons if r is not None]

    @property
    def drifted(self) -> list[bool]:
        return [r is not None for r in self.reasons]


def violation(trajectory_id: str, ids: Sequence[int], mask: Sequence[int], sampled_hash: int | None) -> str | None:
    """Why this sample breaks the invariant, or None when it holds (or it carries no hash to check against)."""
    if len(ids) != len(mask):
        return f"trajectory {trajectory_id!r}: {len(ids)} ids but {len(mask)} mask entries"
    if mask and mask[0]:
        return f"trajectory {trajectory_id!r}: the first prompt token is trainable (mask[0] = 1)"
    if sampled_hash is None:
        return None
    trained = extend(None, (t for t, m in zip(ids, mask) if m))
    if trained != sampled_hash:
        return (f"trajectory {trajectory_id!r}: the {sum(1 for m in mask if m)} trainable ids are not the ids the "
                "policy sampled (a re-tokenised turn, a shifted mask, or a tool result marked trainable)")
    return None


def check(samples: Iterable[tuple[str, Sequence[int], Sequence[int], int | None]]) -> TitoReport:
    """Judge (trajectory id, ids, mask, sampled hash) samples, in order."""
    report = TitoReport(reasons=[])
    for trajectory_id, ids, mask, sampled_hash in samples:
        report.unchecked += sampled_hash is None
        report.reasons.append(violation(trajectory_id, ids, mask, sampled_hash))
    return report
