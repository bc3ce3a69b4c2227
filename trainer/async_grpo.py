"""Asynchronous GRPO: rollout workers generate the next batches while the learner trains on the current one.

Versions: version v is the policy after v committed updates; step s trains batch s and makes version s + 1.
With `grpo.max_staleness` = k, batch b is handed to the rollout workers as soon as the learner is at version
b - k, so the workers are up to k batches ahead and every token of batch b comes from a version >= b - k: no
trained sample is older than k. Generation is throttled, so nothing is ever generated only to be dropped (the
driver checks the bound on every batch and fails loudly if it were broken). k = 0 is the synchronous loop.

Partial rollouts: after each commit the new weights are published on the `WeightBoard`; a rollout in flight
samples its next turn with the newest version (`grpo.partial_rollouts`), and records per turn which version
sampled it (`Rollout.turn_versions`, with the per-token log-probs that version computed, which is what the
rollout correction in trainer.core_algos compares the learner's π_old against).

Resume: the board decides which version samples each turn of each rollout and appends that decision durably to
`versions.jsonl` before the turn is sampled, so every tool call a rollout made follows a logged decision. A
resumed run re-runs the batches in flight (the same trajectory ids and per-rollout RNG) with the same decisions
and the same weights (the checkpoint keeps the k versions before its own, the oldest an in-flight batch can
use): the same tokens, the same tool calls, answered from the trajectory log. Weights are published only after
their checkpoint is committed, so no decision can name a version a kill lost.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from transformers import PreTrainedModel

from trainer.checkpoint import CheckpointError
from trainer.config import ExperimentConfig
from trainer.policy import build_policy
from trainer.rollout import run_rollouts
from trainer.tokenizer import V4Tokenizer

DECISIONS = "versions.jsonl"  # in the run's out_dir: one {"t": trajectory id, "turn": n, "v": version} per line


def read_decisions(path: Path) -> dict[tuple[str, int], int]:
    """The logged (trajectory id, turn) -> version decisions. A torn last line (a kill mid-append) is ignored:
    its append had not returned, so no turn was sampled under it."""
    decided: dict[tuple[str, int], int] = {}
    if not path.exists():
        return decided
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        decided[(d["t"], d["turn"])] = d["v"]
    return decided


class VersionUnavailable(CheckpointError):
    """A turn needs weights the board no longer (or never) held: the run resumed with another max_staleness
    than it started with (the checkpoint keeps only the versions its own k needs)."""


@ray.remote(num_cpus=0)
class WeightBoard:
    """The published policy versions (object-store references, newest and the k before it) and the durable
    log of which version sampled each rollout turn. One per run, on the driver's node (it writes `out_dir`)."""

    def __init__(self, log_path: str, fresh: bool) -> None:
        self.path = Path(log_path)
        if fresh:
            self.path.unlink(missing_ok=True)
        self.decided = read_decisions(self.path)
        self.log = open(self.path, "a")  # noqa: SIM115 - held for the run: one fsync'd append per batched turn
        self.refs: dict[int, ray.ObjectRef] = {}
        self.latest = -1

    def publish(self, version: int, weights: list[ray.ObjectRef], keep_from: int) -> None:
        """`weights`: [the version's state-dict reference] (boxed, so Ray hands the reference, not the tensors)."""
        self.refs[version] = weights[0]
        self.latest = max(self.latest, version)
        for old in [v for v in self.refs if v < keep_from]:
            del self.refs[old]

    def assign(self, trajectory_ids: list[str], turn: int) -> list[int]:
        """The version that samples `turn` of each rollout: the logged one, else the newest (logged first)."""
        new = [t for t in trajectory_ids if (t, turn) not in self.decided]
        if new:
            for tid in new:
                self.decided[(tid, turn)] = self.latest
            self.log.write("".join(json.dumps({"t": t, "turn": turn, "v": self.latest}) + "\n" for t in new))
            self.log.flush()
            os.fsync(self.log.fileno())
        return [self.decided[(t, turn)] for t in trajectory_ids]

    def weights(self, version: int) -> list[ray.ObjectRef]:
        if version not in self.refs:
            raise VersionUnavailable(f"policy version {version} is not held (held: {sorted(self.refs)}): resume "
                                     "with the grpo.max_staleness the run was started with")
        return [self.refs[version]]


class BoardSchedule:
    """A rollout worker's `VersionSchedule`: asks the board per turn, loads a version's weights when it changes."""

    def __init__(self, board: ray.actor.ActorHandle, model: PreTrainedModel, partial: bool) -> None:
        self.board, self._model, self.partial = board, model, partial
        self.loaded: int | None = None
        self.first: dict[str, int] = {}

    def versions(self, trajectory_ids: list[str], turn: int) -> list[int]:
        if turn > 0 and not self.partial:  # every turn on the version that sampled the first
            return [self.first[t] for t in trajectory_ids]
        got = ray.get(self.board.assign.remote(trajectory_ids, turn))
        if turn == 0:
            self.first.update(zip(trajectory_ids, got))
        return got

    def model(self, version: int) -> PreTrainedModel:
        if version != self.loaded:
            [ref] = ray.get(self.board.weights.remote(version))
            self._model.load_state_dict(ray.get(ref))
            self.loaded = version
        return self._model


@ray.remote(num_cpus=0)
class AsyncRolloutWorker:
    """A policy copy and a dsec client; runs batches of rollouts with the versions the board assigns."""

    def __init__(self, cfg_json: str, tokenizer_path: str, address: str) -> None:
        import dsec

        self.cfg = ExperimentConfig.model_validate_json(cfg_json)
        torch.set_num_threads(self.cfg.torch_threads)
        self.tok = V4Tokenizer.load(Path(tokenizer_path))
        tok = self.tok
        self.model = build_policy(self.cfg.policy.name, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id,
                                  self.cfg.seed).eval()
        self.client = dsec.Client(address=address)

    def run(self, board: ray.actor.ActorHandle, jobs: list[tuple[str, dict]], seed: int) -> list[dict]:
        from dataclasses import asdict

        from trainer.tasks import Problem

        schedule = BoardSchedule(board, self.model, self.cfg.grpo.partial_rollouts)
        parsed = [(tid, Problem.model_validate(p)) for tid, p in jobs]
        # the first turn's decisions, taken now: they also tag a rollout that fails before sampling anything
        start = min(schedule.versions([tid for tid, _ in jobs], 0))
        out = run_rollouts(self.model, self.tok, self.client, parsed, self.cfg.rollout, self.cfg.sandbox, seed,
                           keep_sandboxes=True, policy_version=start, schedule=schedule)
        return [asdict(r) for r in out]


class Pipeline:
    """The driver's side: hands batches to the workers up to k versions ahead, collects them in order, publishes
    each committed version, and keeps the k versions before the newest for the checkpoint."""

    def __init__(self, cfg: ExperimentConfig, tokenizer_path: Path, dsec_address: str, out: Path, fresh: bool,
                 jobs_of: Callable[[int], list[tuple[str, dict]]], last: int) -> None:
        """`jobs_of(b)`: batch b's (trajectory id, problem) list; `last`: batches from `last` on are never run."""
        self.cfg, self.k, self.jobs_of, self.last = cfg, cfg.grpo.max_staleness, jobs_of, last
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.board = WeightBoard.options(scheduling_strategy=here).remote(str(out / DECISIONS), fresh)
        cfg_json = cfg.model_dump_json()
        self.workers = [AsyncRolloutWorker.remote(cfg_json, str(tokenizer_path), dsec_address)
                        for _ in range(cfg.grpo.num_rollout_workers)]
        self.pending: dict[int, tuple[list[str], list[ray.ObjectRef]]] = {}
        self.refs: dict[int, ray.ObjectRef] = {}

    def start(self, version: int, weights: ray.ObjectRef, history: dict[int, dict[str, torch.Tensor]]) -> None:
        """Publish the learner's current version and the older ones a resumed checkpoint kept."""
        for v, state in sorted(history.items()):
            self.publish(v, ray.put(state))
        self.publish(version, weights)

    def publish(self, version: int, weights: ray.ObjectRef) -> None:
        self.refs[version] = weights
        keep_from = version - self.k
        for old in [v for v in self.refs if v < keep_from]:
            del self.refs[old]
        ray.get(self.board.publish.remote(version, [weights], keep_from))

    def history(self, version: int) -> dict[int, dict[str, torch.Tensor]]:
        """The versions before `version` that batches still in flight may use (what a checkpoint must keep)."""
        return {v: ray.get(ref) for v, ref in self.refs.items() if version - self.k <= v < version}

    def collect(self, step: int) -> tuple[list[dict], float]:
        """Batch `step`'s rollouts in job order, and the seconds the learner waited for them. Hands batches up to
        step + k to the workers first (the learner is at version `step`)."""
        for b in range(step, min(step + self.k, self.last - 1) + 1):
            if b not in self.pending:
                self._dispatch(b)
        ids, futures = self.pending.pop(step)
        started = time.perf_counter()
        results = ray.get(futures)
        waited = time.perf_counter() - started
        by_id = {r["trajectory_id"]: r for shard in results for r in shard}
        rollouts = [by_id[tid] for tid in ids]
        stale = [r["trajectory_id"] for r in rollouts if step - r["policy_version"] > self.k]
        if stale:  # the dispatch rule makes this impossible: a broken invariant must not train silently
            raise RuntimeError(f"{len(stale)} samples of batch {step} are older than max_staleness={self.k} "
                               f"(e.g. {stale[0]!r})")
        return rollouts, waited

    def _dispatch(self, batch: int) -> None:
        jobs = self.jobs_of(batch)
        shards = [jobs[i::len(self.workers)] for i in range(len(self.workers))]
        futures = [w.run.remote(self.board, shard, self.cfg.seed) for w, shard in zip(self.workers, shards) if shard]
        self.pending[batch] = ([tid for tid, _ in jobs], futures)

    def actors(self) -> list[ray.actor.ActorHandle]:
        return [*self.workers, self.board]


def turn_metrics(rollouts: list[dict]) -> dict[str, float]:
    """`partial_rollouts`: samples whose turns came from more than one policy version (they crossed an update)."""
    return {"partial_rollouts": float(sum(len(set(r["turn_versions"])) > 1 for r in rollouts))}
