"""GRPO on Ray: rollout-worker actors, a learner actor (policy + reference + optimizer), a driver loop.

Each step the learner's weights go into the object store once and every rollout worker loads them from
there. Each rollout runs in its own sandbox under the trajectory `run/step-S/prompt-P/sample-G`. Before a step
starts, its in-flight rollout ids are written to the run state (`state.json`); after the update, one checkpoint
(`learner.pt`: model, reference, optimizer, RNG, step, data cursor, the step's sandboxes; trainer/checkpoint.py)
is written atomically. `--resume` after a kill -9 at any point re-runs the interrupted step with the same ids and
the same per-rollout RNG: the trajectory log answers the tool calls already made, and the step's weights equal
those of an uninterrupted run. A checkpoint whose step disagrees with the run state is refused.

`--report-phases` prints a line per phase of each step (`phase=<name> step=<n>`, names in `PHASES`) and waits
for a line on stdin before going on, so a test can kill the trainer exactly between two phases.

With `grpo.max_staleness` > 0 the rollouts come from trainer.async_grpo's pipeline instead: workers generate up
to that many batches ahead of the learner and pick up each committed version between turns; the step, the run
state and the checkpoint (which then also keeps the older versions in-flight batches use) are this same loop.

On-policy distillation is this same loop with `algo.opd` set: per-family `TeacherActor`s (trainer/teachers.py)
score each step's rollouts between sampling and the update, and the learner's OPD token adjustment uses them.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import ray
import torch

from trainer import checkpoint
from trainer.async_grpo import Pipeline, turn_metrics
from trainer.config import ExperimentConfig, load_config
from trainer.core_algos import staleness_histogram
from trainer.data import problems
from trainer.learner import Learner
from trainer.metrics import MetricsLog, plot_rewards
from trainer.policy import build_policy
from trainer.rollout import Rollout, run_rollouts
from trainer.teachers import score_rollouts, start_teachers
from trainer.tokenizer import V4Tokenizer


def _policy(cfg: ExperimentConfig, tok: V4Tokenizer, weights: Path | None):
    torch.set_num_threads(cfg.torch_threads)
    model = build_policy(cfg.policy.name, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, cfg.seed)
    if weights is not None:
        model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


@ray.remote(num_cpus=0)
class RolloutWorker:
    """Holds a policy copy and a dsec client (shared server address) and runs batches of rollouts."""

    def __init__(self, cfg_json: str, tokenizer_path: str, address: str) -> None:
        import dsec

        self.cfg = ExperimentConfig.model_validate_json(cfg_json)
        self.tok = V4Tokenizer.load(Path(tokenizer_path))
        self.model = _policy(self.cfg, self.tok, None)
        self.client = dsec.Client(address=address)

    def run(self, weights: dict[str, torch.Tensor], jobs: list[tuple[str, dict]], seed: int, version: int = 0
            ) -> list[dict]:
        """`version`: the learner step the weights are from, recorded in each rollout (its staleness later)."""
        from trainer.tasks import Problem

        self.model.load_state_dict(weights)
        parsed = [(tid, Problem.model_validate(p)) for tid, p in jobs]
        out = run_rollouts(self.model, self.tok, self.client, parsed, self.cfg.rollout, self.cfg.sandbox, seed,
                           keep_sandboxes=True, policy_version=version)
        return [asdict(r) for r in out]


@ray.remote(num_cpus=0)
class LearnerActor:
    def __init__(self, cfg_json: str, tokenizer_path: str, init_weights: str | None) -> None:
        cfg = ExperimentConfig.model_validate_json(cfg_json)
        tok = V4Tokenizer.load(Path(tokenizer_path))
        torch.manual_seed(cfg.seed)
        model = _policy(cfg, tok, Path(init_weights) if init_weights else None)
        self.group_size = cfg.grpo.group_size
        self.updates = cfg.grpo.updates_per_step
        self.learner = Learner(model, cfg.algorithm(), cfg.grpo.lr, cfg.grpo.grad_clip, tok.pad_id, cfg.grpo.freeze)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.learner.weights()

    def update(self, rollouts: list[dict], teacher: list[torch.Tensor] | None = None) -> dict[str, float]:
        return self.learner.update([Rollout(**r) for r in rollouts], self.group_size, self.updates, teacher)

    def save(self, path: str, manifest: dict, sandboxes: list[str], extra: dict | None = None) -> None:
        """The one checkpoint of the run: the learner's payload with the driver's step, cursor and sandboxes
        (and `extra`: the async pipeline's older policy versions)."""
        checkpoint.save(Path(path), checkpoint.Manifest.model_validate(manifest),
                        {**self.learner.payload(), "sandboxes": sandboxes, **(extra or {})})

    def load(self, path: str) -> None:
        self.learner.restore(checkpoint.load(Path(path))[1])


# The phases of one step, in order, as `--report-phases` reports them: the run state names the step's rollouts;
# the rollouts are done; the update is done (not yet saved); the metrics record is written; the checkpoint is
# committed; the run state says the step is done (its sandboxes destroyed).
PHASES = ("inflight", "rolled_out", "updated", "logged", "committed", "done")


def fresh_state(cfg: ExperimentConfig) -> dict:
    """A new run's state. RL prompts start after the SFT demonstrations' problems (the train split never repeats
    a problem): a policy that memorised a demonstrated answer must not be rewarded for recalling it."""
    return {"run_id": f"{cfg.run_name}-{secrets.token_hex(4)}", "step": 0, "cursor": cfg.sft.examples, "inflight": []}


def _resume_state(state_path: Path, ckpt: Path) -> tuple[dict | None, list[str]]:
    """The run state to go on from, checked against the checkpoint (None: nothing to resume), and the sandboxes
    of a step committed just before a kill."""
    run_state = json.loads(state_path.read_text()) if state_path.exists() else None
    manifest, payload = checkpoint.load(ckpt) if ckpt.exists() else (None, {})
    state, committed = checkpoint.reconcile(run_state, manifest, state_path, ckpt)
    return state, payload["sandboxes"] if committed else []


def _destroy(client, sandbox_ids: list[str]) -> None:
    import dsec

    for sandbox_id in sandbox_ids:  # the step is committed: its sandboxes are no longer needed for replay
        try:
            client.destroy(sandbox_id)
        except dsec.DsecError:
            pass  # already expired or reaped


def step_jobs(cfg: ExperimentConfig, run_id: str, step: int, cursor: int) -> list[tuple[str, dict]]:
    """The step's (trajectory id, problem) list: `prompts_per_step` train problems × `group_size` samples."""
    batch = problems(cfg.tasks.families, "train", cfg.grpo.prompts_per_step, cfg.tasks.seed, start=cursor)
    return [(f"{run_id}/step-{step}/prompt-{cursor + p}/sample-{g}", prob.model_dump())
            for p, prob in enumerate(batch) for g in range(cfg.grpo.group_size)]


def init_ray(address: str | None, attempts: int = 3, num_cpus: int = 2, temp_dir: str | None = None) -> None:
    """Connect to `address`, or start a private local Ray on loopback (no token auth: a stray
    ~/.ray/auth_token breaks it). A local start is retried: on a loaded machine the raylet can miss Ray's fixed
    30 s registration window (measured here at load average > 8), and a fresh start then succeeds."""
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for attempt in range(1 if address else attempts):
        try:
            ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                     _temp_dir=temp_dir or os.environ.get("DSEC_RAY_TMPDIR"), log_to_driver=False,
                     configure_logging=False)
            return
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception on a startup timeout
            ray.shutdown()
            if address or attempt == attempts - 1:
                raise


def train_grpo(cfg: ExperimentConfig, tokenizer_path: Path, init_weights: Path | None, *, address: str | None,
               dsec_address: str, resume: bool, max_steps: int | None = None, progress: bool = True,
               on_step: Callable[[int, dict[str, float]], None] | None = None,
               on_phase: Callable[[str, int], None] | None = None, pipeline: bool | None = None) -> dict:
    """Run (or resume) GRPO (or OPD, with `algo.opd`); returns the final state. `max_steps` stops early (tests);
    checkpoints every step; `on_step(step, metrics)` runs after each step's checkpoint (e.g. a held-out eval);
    `on_phase(phase, step)` at each of `PHASES` (trainer.checkpoint says what a kill at each one leaves).
    `pipeline`: None takes the async pipeline when `grpo.max_staleness` > 0; True takes it even at 0, where it is
    the synchronous schedule (tests/trainer/test_async_grpo.py checks that bit for bit).
    Raises `checkpoint.CheckpointMismatch` when `resume` finds a checkpoint of another step or run."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path, ckpt = out / "state.json", out / "learner.pt"
    state, leftover = _resume_state(state_path, ckpt) if resume else (None, [])
    fresh = state is None
    if state is None:
        state = fresh_state(cfg)
        ckpt.unlink(missing_ok=True)  # a previous run's checkpoint must not pair with this run's state
        checkpoint.write_json(state_path, state)
    report = on_phase or (lambda phase, step: None)
    if not ray.is_initialized():
        init_ray(address)
    cfg_json = cfg.model_dump_json()
    opd = cfg.algorithm().opd
    teachers = start_teachers(cfg, tokenizer_path)  # checks every family has a teacher before anything starts
    learner = LearnerActor.remote(cfg_json, str(tokenizer_path), str(init_weights) if init_weights else None)
    if ckpt.exists():
        ray.get(learner.load.remote(str(ckpt)))
    last = cfg.grpo.steps if max_steps is None else min(cfg.grpo.steps, max_steps)
    pipe = None
    if pipeline or (pipeline is None and cfg.grpo.max_staleness > 0):
        per_step = cfg.grpo.prompts_per_step
        pipe = Pipeline(cfg, tokenizer_path, dsec_address, out, fresh, last=last, jobs_of=lambda b: step_jobs(
            cfg, state["run_id"], b, state["cursor"] + (b - state["step"]) * per_step))
        history = checkpoint.load(ckpt)[1].get("history", {}) if ckpt.exists() else {}
        pipe.start(state["step"], learner.weights.remote(), history)
    workers = [] if pipe else [RolloutWorker.remote(cfg_json, str(tokenizer_path), dsec_address)
                               for _ in range(cfg.grpo.num_rollout_workers)]
    import dsec

    client = dsec.Client(address=dsec_address)
    if leftover:  # the step was committed just before a kill: finish its bookkeeping
        _destroy(client, leftover)
        checkpoint.write_json(state_path, state)
    log = MetricsLog(out, keep_through_step=state["step"])
    from tqdm import tqdm

    bar = tqdm(range(state["step"], last), desc="opd" if opd is not None else "grpo", disable=not progress,
               initial=state["step"], total=last)
    for step in bar:
        started = time.perf_counter()
        jobs = step_jobs(cfg, state["run_id"], step, state["cursor"])
        state["inflight"] = [tid for tid, _ in jobs]
        checkpoint.write_json(state_path, state)
        report("inflight", step + 1)
        if pipe is None:
            weights = learner.weights.remote()  # one object-store copy, read by every worker
            shards = [jobs[i::len(workers)] for i in range(len(workers))]
            seed = cfg.seed
            results = ray.get([w.run.remote(weights, shard, seed, step) for w, shard in zip(workers, shards)
                               if shard])
            by_id = {r["trajectory_id"]: r for shard in results for r in shard}
            rollouts = [by_id[tid] for tid, _ in jobs]
        else:
            rollouts, waited = pipe.collect(step)
        report("rolled_out", step + 1)
        scores = score_rollouts(teachers, rollouts, opd) if opd is not None else None
        metrics = ray.get(learner.update.remote(rollouts, scores))
        report("updated", step + 1)
        metrics.update(
            step=step + 1,
            step_time_s=time.perf_counter() - started,
            tools_live=sum(r["tools_live"] for r in rollouts),
            tools_replayed=sum(r["tools_replayed"] for r in rollouts),
            samples=len(rollouts),
            sampled_tokens=sum(sum(r["mask"]) for r in rollouts),
            parse_errors=sum(r["parse_errors"] for r in rollouts),
            **staleness_histogram([r["policy_version"] for r in rollouts], step),  # the weights trained here: step
        )
        if pipe is not None:
            metrics.update(rollout_wait_s=waited, **turn_metrics(rollouts))
        log.write(metrics)  # before the commit: a resume drops records past the checkpoint's step
        report("logged", step + 1)
        cursor = state["cursor"] + cfg.grpo.prompts_per_step
        extra = {} if pipe is None else {"history": pipe.history(step + 1)}
        manifest = checkpoint.Manifest(run_id=state["run_id"], step=step + 1, cursor=cursor,
                                       contents=[*checkpoint.CONTENTS, *extra])
        sandboxes = [r["sandbox_id"] for r in rollouts if r["sandbox_id"]]  # a failed rollout has none left
        ray.get(learner.save.remote(str(ckpt), manifest.model_dump(), sandboxes, extra))
        report("committed", step + 1)
        if pipe is not None:  # only a committed version is published: no turn can use weights a kill loses
            pipe.publish(step + 1, learner.weights.remote())
        _destroy(client, sandboxes)
        state.update(step=step + 1, cursor=cursor, inflight=[])
        checkpoint.write_json(state_path, state)
        report("done", step + 1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}")
        if on_step is not None:
            on_step(step + 1, metrics)
    log.close()
    plot_rewards(out, out / "reward_curve.png")
    client.close()
    final = {"state": state, "checkpoint": str(ckpt)}
    for actor in [*workers, *teachers.values(), learner, *(pipe.actors() if pipe else [])]:
        ray.kill(actor)
    return final


def _lockstep(phase: str, step: int) -> None:
    """`--report-phases`: say where the step is, then wait for the controller's go-ahead (a line on stdin)."""
    print(f"phase={phase} step={step}", flush=True)
    sys.stdin.readline()


def main() -> None:
    parser = argparse.ArgumentParser(description="GRPO on Ray with tools through dsec")
    parser.add_argument("config", type=Path)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--init", type=Path, help="SFT weights to start from (state_dict)")
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    parser.add_argument("--dsec-address", help="dsec server (default: $DSEC_ADDRESS, else an embedded server)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report-phases", action="store_true",
                        help="print phase=<name> step=<n> at each phase of a step and wait for a line on stdin")
    args = parser.parse_args()
    cfg = load_config(args.config)
    import dsec

    client = dsec.Client(address=args.dsec_address)
    try:
        result = train_grpo(cfg, args.tokenizer, args.init, address=args.address, dsec_address=client.address,
                            resume=args.resume, max_steps=args.max_steps, progress=not args.no_progress,
                            on_phase=_lockstep if args.report_phases else None)
    except checkpoint.CheckpointError as exc:
        parser.exit(2, f"trainer.grpo: {type(exc).__name__}: {exc}\n")
    finally:
        client.close()
    print(json.dumps(result["state"]))


if __name__ == "__main__":
    main()
