"""What the gateway remembers: every sampled choice's token ids and log-probs, grouped into trajectories.

Why keep ids and not text: an agent harness sends the conversation back as text and JSON, and re-tokenising
that text need not give the ids the policy sampled (token drift). So when a later request of the same
trajectory contains an assistant message the gateway produced, the gateway splices in that turn's sampled ids
instead of tokenising the message; the resulting training sample is the exact token sequence the policy saw
and produced, with mask 1 only on sampled ids (prompts, tool results and anything the harness wrote: 0).

A trajectory's samples are its leaf turns (turns no later request continued): each is the chain of turns
spliced into its prompt plus its own completion. Samples are the learner's `Rollout`s, with the rollout log-probs
(for rollout correction), the oldest policy version of the chain, a stop reason, and the `trainer.tito` hash of
the sampled ids taken from the records (not from the mask), so the learner's check cross-examines the splice.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer import tito
from trainer.encoding import ToolCall
from trainer.rollout import Rollout


@dataclass
class Turn:
    """One sampled choice of one request."""

    turn_id: str  # the OpenAI tool-call id prefix of this choice: f"call_{request id}_{choice}"
    request_id: str
    choice: int
    prompt_ids: list[int]
    prompt_mask: list[int]  # 1 where the prompt holds ids spliced from an earlier turn's completion
    prompt_logprobs: list[float | None]  # those ids' rollout log-probs (None at mask 0)
    completion_ids: list[int]
    logprobs: list[float]
    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    finish_reason: str
    policy_version: int
    parents: list[str] = field(default_factory=list)  # turn ids spliced into the prompt, in order


@dataclass
class GatewaySample:
    """One training sample: the learner's `Rollout` plus what only the gateway knows."""

    rollout: Rollout
    logprobs: list[float]  # rollout-time log-probs of the mask = 1 ids, in order
    turn_ids: list[str]
    policy_versions: list[int]

    def to_json(self) -> dict[str, Any]:
        return {"rollout": asdict(self.rollout), "logprobs": self.logprobs, "turn_ids": self.turn_ids,
                "policy_versions": self.policy_versions}


class Recorder:
    """Thread-safe store of turns by trajectory id. With `journal`, every change is also appended to that JSONL
    file (flushed before the response is sent) and replayed at start, so a restarted gateway still exports the
    samples and splices the turns it recorded before."""

    def __init__(self, journal: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._turns: dict[str, list[Turn]] = {}
        self._rewards: dict[str, float] = {}
        self._journal = None
        if journal is not None:
            if journal.exists():
                for line in journal.read_text().splitlines():
                    if line.strip():
                        self._apply(json.loads(line))
            journal.parent.mkdir(parents=True, exist_ok=True)
            self._journal = journal.open("a")

    def _apply(self, entry: dict[str, Any]) -> None:
        tid = entry["trajectory_id"]
        if "turn" in entry:
            turn = dict(entry["turn"])
            turn["tool_calls"] = [ToolCall.model_validate(c) for c in turn["tool_calls"]]
            self._turns.setdefault(tid, []).append(Turn(**turn))
        elif "reward" in entry:
            self._rewards[tid] = entry["reward"]
        elif entry.get("forget"):
            self._turns.pop(tid, None)
            self._rewards.pop(tid, None)

    def _log(self, entry: dict[str, Any]) -> None:
        """Caller holds the lock; the entry is applied and, with a journal, written and flushed."""
        self._apply(entry)
        if self._journal is not None:
            self._journal.write(json.dumps(entry) + "\n")
            self._journal.flush()

    def record(self, trajectory_id: str, turn: Turn) -> None:
        entry = asdict(turn)
        entry["tool_calls"] = [c.model_dump() for c in turn.tool_calls]
        with self._lock:
            self._log({"trajectory_id": trajectory_id, "turn": entry})

    def set_reward(self, trajectory_id: str, reward: float) -> None:
        with self._lock:
            if trajectory_id not in self._turns:
                raise KeyError(trajectory_id)
            self._log({"trajectory_id": trajectory_id, "reward": reward})

    def forget(self, trajectory_id: str) -> int:
        """Drop a trajectory's records (after its samples were exported); returns how many turns it had."""
        with self._lock:
            if trajectory_id not in self._turns:
                raise KeyError(trajectory_id)
            count = len(self._turns[trajectory_id])
            self._log({"trajectory_id": trajectory_id, "forget": True})
        return count

    def close(self) -> None:
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None

    def trajectory_ids(self) -> list[str]:
        with self._lock:
            return list(self._turns)

    def match(self, trajectory_id: str, content: str, tool_calls: list[tuple[str, ToolCall]]) -> Turn | None:
        """The recorded turn an assistant message echoes: same tool-call ids (which name the turn) and the same
        calls and content, or, without calls, the latest turn with the same content. An edited echo matches
        nothing: its text is then tokenised and masked, since the policy did not sample it."""
        with self._lock:
            turns = list(self._turns.get(trajectory_id, ()))
        if tool_calls:
            prefix = tool_calls[0][0].rsplit("_", 1)[0]
            for turn in turns:
                if turn.turn_id == prefix:
                    same = [f"{prefix}_{k}" for k in range(len(turn.tool_calls))] == [cid for cid, _ in tool_calls]
                    calls = [c for _, c in tool_calls]
                    return turn if same and calls == turn.tool_calls and content == turn.content else None
            return None
        for turn in reversed(turns):
            if not turn.tool_calls and turn.content == content:
                return turn
        return None

    def samples(self, trajectory_id: str) -> list[GatewaySample]:
        with self._lock:
            turns = list(self._turns.get(trajectory_id, ()))
            reward = self._rewards.get(trajectory_id, 0.0)
        if not turns:
            raise KeyError(trajectory_id)
        by_id = {t.turn_id: t for t in turns}
        continued = {p for t in turns for p in t.parents}
        out = []
        for leaf in (t for t in turns if t.turn_id not in continued):
            chain = [by_id[p] for p in leaf.parents] + [leaf]
            ids = leaf.prompt_ids + leaf.completion_ids
            mask = leaf.prompt_mask + [1] * len(leaf.completion_ids)
            logprobs = [lp for lp in leaf.prompt_logprobs if lp is not None] + leaf.logprobs
            sampled = None
            for t in chain:
                sampled = tito.extend(sampled, t.completion_ids)
            calls = sum(len(t.tool_calls) for t in chain)
            aligned = iter(logprobs)  # the learner's rollout correction wants them per id, 0.0 where mask = 0
            rollout = Rollout(trajectory_id=trajectory_id, problem_id=leaf.turn_id, family="gateway", ids=ids,
                              mask=mask, reward=reward, turns=len(chain), final=leaf.content, tool_calls=calls,
                              sampled_hash=sampled, logprobs=[next(aligned) if m else 0.0 for m in mask],
                              # the oldest weights in the chain: staleness is that of its earliest sampled ids
                              policy_version=min(t.policy_version for t in chain),
                              stop_reason="length" if leaf.finish_reason == "length" else "eos")
            out.append(GatewaySample(rollout, logprobs, [t.turn_id for t in chain], [t.policy_version for t in chain]))
        return out
