"""Rollouts: async GRPO against sync at the same sample budget, 64 concurrent multi-turn rollouts through dsec, and
the held-out success of the two policies.

One process, one local Ray, one embedded dsec server. The run first trains its own warm start with the demo's
stages (trainer/stages.py, trainer/configs/tiny-cpu.yaml: tokenizer, then --sft-steps SFT steps, 1,000 like the
demo), then runs GRPO from those weights with the demo's GRPO settings (DAPO, 4 prompts x G=8 a step, 4 turns of up
to 112 tokens, tools through real container sandboxes) and --workers rollout workers:

  async_over_sync_throughput  samples/s of GRPO with grpo.max_staleness = --k (partial rollouts on) over the same
                              run with 0, both --steps steps of the same size from the same SFT weights; the runs
                              alternate (sync, async, sync, ...) --rounds times so machine noise hits both;
                              samples/s counts the steps after the first (the first holds actor start-up and,
                              async, the pipeline fill)
  {sync,async}_learner_busy   share of those steps' wall time the driver spent in the learner's update and save
                              (from `rolled_out` to `committed` of each step, trainer.grpo's phases)
  {sync,async}_rollout_wait   share it spent waiting for the step's rollouts (`inflight` to `rolled_out`): the
                              time the async pipeline hides by sampling the next batch during the update
  {sync,async}_cpu_busy       share of the machine's cores busy over those steps (/proc/stat: every process,
                              the sandboxes' and the dsec server's included)
  async_cpu_ceiling           1 / sync_cpu_busy: the most async_over_sync_throughput can be on this machine, were
                              the sync run's work spread over every core all the time (an overlap fills idle
                              cores; it makes no work cheaper)
  rollouts_per_s              --rollouts multi-turn rollouts run as one batch (trainer.rollout, each in its own
                              container sandbox, claimed from a warm pool the server filled before the batch;
                              the pool refills behind the claims during the batch, as it would for the next
                              one); the batch runs --rounds times (fresh trajectory ids, same problems), and
                              this and sandbox_wait_fraction are the medians, with their ranges beside them
  sandbox_wait_fraction       of that batch's wall time, the share the rollout loop's thread was blocked on
                              sandbox work with nothing it may sample (`trainer.rollout_lanes.BatchStats`): at
                              each turn's end until the tool results of every rollout that goes on are back, at
                              the batch's end until every verifier and destroy has returned. Claims, file
                              writes, tool calls, verifiers and destroys run in one lane per rollout on
                              rollout.sandbox_concurrency threads while the loop samples; the time they take
                              then is not waiting (their own sum is printed beside it). At concurrency 1 every
                              sandbox call runs on the loop's thread and all of it counts
  sampler_speedup             generation seconds of the sampler's recomputation path over its incremental V4
                              decoder (trainer.v4_decode), each sampling the first turn of the same --sampler-rows
                              prompts with the SFT weights and the demo's rollout settings, timed interleaved
                              --rounds times (median of the per-round ratios); both must sample the same ids
  tito_violations             token-in/token-out violations (trainer.tito) over every trained and benched sample
  heldout_sft, heldout_sync, heldout_async
                              success (mean reward) on the same --heldout held-out problems, sampled at the
                              rollout temperature with the same per-problem random stream for every policy: the
                              SFT weights, the last round's sync policy and its async policy (equal sample
                              budget, same start); each "p[lo,hi]" with a 95 % normal interval
  heldout_async_minus_sync    the paired difference in points, and heldout_diff_ci95 its 95 % interval (normal
                              approximation on the per-problem differences); "not_measured" with --no-heldout

Progress lines go to stdout as it runs; the last line is key=value pairs. `--quick` is the small version the
tests run (its SFT is too short to solve anything: it checks the plumbing, not the numbers). `--warm-start DIR`
takes tokenizer.json and sft.pt from an earlier run's work directory instead of training them (iterations on
the rollout side; say so next to any figure it gives).

Usage: .venv/bin/python -m bench.rollouts [--quick] [--rounds 2] [--steps 4] [--k 1] [--workers 2] [--heldout 128]
                                          [--sft-steps 1000] [--sampler-rows 32] [--sandbox-concurrency N] [--waves N]
                                          [--warm-start DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from bench.harness import progress, report
from trainer import tito
from trainer.config import ExperimentConfig, load_config
from trainer.data import problems
from trainer.policy import build_policy
from trainer.stages import stage_sft, stage_tokenizer
from trainer.tokenizer import V4Tokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "trainer" / "configs" / "tiny-cpu.yaml"


def say(msg: str) -> None:
    progress("rollouts", msg)


def base_config(out: Path, args: argparse.Namespace) -> ExperimentConfig:
    """The demo's config with the bench's sizes: SFT steps, GRPO steps and workers, held-out size."""
    overrides: dict[str, object] = {
        "run_name": "bench", "out_dir": str(out), "sft.steps": args.sft_steps, "grpo.steps": args.steps,
        "grpo.num_rollout_workers": args.workers, "tasks.heldout_size": args.heldout}
    if args.quick:
        overrides.update({"sft.examples": 200, "grpo.group_size": 2, "rollout.max_turns": 2})
    if args.sandbox_concurrency is not None:
        overrides["rollout.sandbox_concurrency"] = args.sandbox_concurrency
    if args.waves is not None:
        overrides["rollout.waves"] = args.waves
    return load_config(DEMO_CONFIG, overrides)


def run_config(base: ExperimentConfig, out: Path, k: int) -> ExperimentConfig:
    grpo = base.grpo.model_copy(update={"max_staleness": k, "partial_rollouts": True})
    return base.model_copy(update={"out_dir": str(out), "grpo": grpo})


def timed_run(cfg: ExperimentConfig, tok_path: Path, sft: Path, address: str) -> dict[str, float]:
    """Samples/s over the steps after the first, the learner-busy and rollout-wait shares of that span, and the
    run's TITO violations."""
    from trainer.grpo import train_grpo

    marks: list[float] = []
    busy: list[float] = []
    phases: list[tuple[str, int, float]] = []
    records: list[dict] = []

    def on_step(step: int, metrics: dict) -> None:
        marks.append(time.perf_counter())
        busy.append(cpu_busy_seconds())
        records.append(metrics)
        say(f"  max_staleness={cfg.grpo.max_staleness} step {step}: reward {metrics['reward_mean']:.2f}, "
            f"staleness_max {metrics['staleness_max']:.0f}, step {metrics['step_time_s']:.1f} s")

    train_grpo(cfg, tok_path, sft, address=None, dsec_address=address, resume=False, progress=False,
               on_step=on_step, on_phase=lambda phase, step: phases.append((phase, step, time.perf_counter())))
    at = {(phase, step): t for phase, step, t in phases}
    later = range(2, len(marks) + 1)
    span = marks[-1] - marks[0]
    return {"rate": sum(r["samples"] for r in records[1:]) / span,
            "learner_busy": sum(at["committed", s] - at["rolled_out", s] for s in later) / span,
            "rollout_wait": sum(at["rolled_out", s] - at["inflight", s] for s in later) / span,
            "cpu_busy": (busy[-1] - busy[0]) / (span * (os.cpu_count() or 1)),
            "tito_violations": sum(r["tito_violations"] for r in records)}


def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (not idle or waiting on I/O), summed over its cores: what
    bounds any overlap on it. From /proc/stat, whose counters are in USER_HZ ticks."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal; guest time is counted in user


def concurrent_rollouts(n: int, tok_path: Path, sft: Path, client, cfg: ExperimentConfig) -> dict[str, float]:
    """`n` multi-turn rollouts as one batch, each in its own sandbox: rollouts/s and the sandbox-wait share."""
    from trainer.rollout import BatchStats, run_rollouts

    tok = V4Tokenizer.load(tok_path)
    model = load_policy(cfg, tok, sft)
    held = problems(cfg.tasks.families, "train", n, cfg.tasks.seed, start=10_000)
    jobs = [(f"bench-rollouts-{time.time_ns()}/step-0/prompt-{i}/sample-0", p) for i, p in enumerate(held)]
    client.pools.resize(cfg.sandbox.image, n)
    deadline = time.monotonic() + 600  # bounds a failure only: the batch starts once the server reports n ready
    while (ready := _ready(client, cfg.sandbox.image)) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm pool has {ready} of {n} sandboxes ready after 600 s")
        time.sleep(0.5)
    say(f"warm pool of {n} ready")
    stats = BatchStats()
    started = time.perf_counter()
    out = run_rollouts(model, tok, client, jobs, cfg.rollout, cfg.sandbox, cfg.seed, stats=stats)
    wall = time.perf_counter() - started
    client.pools.resize(cfg.sandbox.image, 0)
    report = tito.check((r.trajectory_id, r.ids, r.mask, r.sampled_hash) for r in out)
    turns = statistics.mean(r.turns for r in out)
    say(f"{n} rollouts in {wall:.1f} s ({turns:.2f} turns each, {sum(r.tool_calls for r in out)} tool calls, "
        f"{sum(r.sandbox_s for r in out):.1f} s in sandbox calls summed over the rollouts, the loop blocked on them "
        f"{stats.sandbox_wait_s:.1f} s at sandbox_concurrency {cfg.rollout.sandbox_concurrency}, stop reasons "
        f"{dict(sorted(Counter(r.stop_reason for r in out).items()))})")
    return {"rollouts_per_s": n / wall, "sandbox_wait_fraction": stats.sandbox_wait_s / wall,
            "tito_violations": float(len(report.violations)), "turns_mean": turns}


def sampler_speedup(cfg: ExperimentConfig, tok_path: Path, sft: Path, rows: int, rounds: int) -> float:
    """Recomputation seconds over incremental-decoder seconds on the same prompts, budgets and random streams,
    timed interleaved; raises if the two paths sample different ids (then the comparison means nothing)."""
    from trainer.rollout import prompt_ids
    from trainer.sampler import sample, sample_generator

    tok = V4Tokenizer.load(tok_path)
    model = load_policy(cfg, tok, sft)
    prompts = [prompt_ids(tok, p, cfg.rollout.thinking)
               for p in problems(cfg.tasks.families, "train", rows, cfg.tasks.seed, start=3_000)]
    budgets = [min(cfg.rollout.max_new_tokens, cfg.rollout.max_total_tokens - len(p)) for p in prompts]
    ratios = []
    for rnd in range(rounds):
        seconds, outs = {}, {}
        for incremental in (True, False):
            gens = [sample_generator("sampler-bench", rnd, i) for i in range(rows)]
            started = time.perf_counter()
            outs[incremental] = sample(model, prompts, gens, max_new_tokens=budgets, eos_id=tok.eos_id,
                                       pad_id=tok.pad_id, temperature=cfg.rollout.temperature,
                                       top_p=cfg.rollout.top_p, incremental=incremental)
            seconds[incremental] = time.perf_counter() - started
        if outs[True] != outs[False]:
            raise RuntimeError("the incremental decoder sampled other ids than recomputation")
        ratios.append(seconds[False] / seconds[True])
        say(f"sampler round {rnd + 1}/{rounds}: {rows} rows, {sum(map(len, outs[True]))} new tokens (prompts "
            f"{min(map(len, prompts))}-{max(map(len, prompts))}): recompute {seconds[False]:.2f} s, incremental "
            f"{seconds[True]:.2f} s, x{ratios[-1]:.1f}")
    return statistics.median(ratios)


def _ready(client, image: str) -> int:
    return sum(p.ready for p in client.pools.list() if p.image == image)


def load_policy(cfg: ExperimentConfig, tok: V4Tokenizer, weights: Path):
    """The policy from a bare state_dict (sft.pt) or a GRPO checkpoint (learner.pt), in eval mode."""
    model = build_policy(cfg.policy.name, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, cfg.seed)
    state = torch.load(weights, weights_only=False)
    model.load_state_dict(state["model"] if "model" in state else state)
    return model.eval()


def heldout_rewards(weights: Path, tok_path: Path, client, cfg: ExperimentConfig, tag: str) -> list[float]:
    """Per-problem reward on the held-out split. Trajectory ids differ only in their leading run component, which
    the sampling RNG ignores (trainer.rollout), so every policy meets each problem with the same random stream:
    the per-problem outcomes are paired."""
    from trainer.rollout import run_rollouts

    tok = V4Tokenizer.load(tok_path)
    model = load_policy(cfg, tok, weights)
    held = problems(cfg.tasks.families, "heldout", cfg.tasks.heldout_size, cfg.tasks.seed)
    run = f"bench-heldout-{time.time_ns()}-{tag}"
    rewards: list[float] = []
    for start in range(0, len(held), 16):
        jobs = [(f"{run}/eval/{start + i}", p) for i, p in enumerate(held[start:start + 16])]
        rewards += [r.reward for r in run_rollouts(model, tok, client, jobs, cfg.rollout, cfg.sandbox, cfg.seed)]
    say(f"held-out {tag}: {interval(rewards)} on {len(rewards)} problems")
    return rewards


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % normal interval."""
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, 1.96 * sd / math.sqrt(len(values))


def interval(values: list[float]) -> str:
    mean, half = mean_ci95(values)
    return f"{mean:.3f}[{max(0.0, mean - half):.3f},{min(1.0, mean + half):.3f}]"


def _start_server(embedded):
    """The embedded server; retried, as its start waits for the machine-wide orphan sweep, which other servers
    starting on this shared machine can hold past the launcher's 120 s."""
    from dsec.errors import ServerUnavailable

    for _ in range(4):
        try:
            return embedded.start()
        except ServerUnavailable:
            say("the dsec server did not come up within 120 s (a shared orphan sweep?); starting it again")
    return embedded.start()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (tests): 20 SFT steps, 1 round of 2 steps of 8 samples of up to 2 turns, "
                             "4 rollouts, 8 held-out problems")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--k", type=int, default=1, help="max_staleness of the async runs")
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="rollout workers of both GRPO runs")
    parser.add_argument("--heldout", type=int, default=128)
    parser.add_argument("--no-heldout", action="store_true")
    parser.add_argument("--sft-steps", type=int, default=1000)
    parser.add_argument("--sampler-rows", type=int, default=32, help="prompts of the sampler_speedup comparison")
    parser.add_argument("--sandbox-concurrency", type=int, default=None,
                        help="rollout.sandbox_concurrency of every rollout in the run (default: the demo config's)")
    parser.add_argument("--waves", type=int, default=None,
                        help="rollout.waves of every rollout in the run (default: the demo config's)")
    parser.add_argument("--warm-start", type=Path, default=None,
                        help="a directory with tokenizer.json and sft.pt (an earlier run's): skip the tokenizer and "
                             "SFT stages")
    args = parser.parse_args(argv)
    if args.warm_start is not None:
        missing = [name for name in ("tokenizer.json", "sft.pt") if not (args.warm_start / name).is_file()]
        if missing:
            parser.error(f"--warm-start {args.warm_start} lacks {', '.join(missing)} (a bench or demo work directory "
                         "has both)")
    if args.quick:
        args.rounds, args.steps, args.rollouts, args.heldout, args.sft_steps = 1, 2, 4, 8, 20
        args.sampler_rows = 8
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import dsec
    from dsec.sdk.embedded import EmbeddedServer
    from trainer.grpo import init_ray

    torch.set_num_threads(1)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-rollouts-"))
    base = base_config(work, args)
    server = _start_server(EmbeddedServer)
    if args.warm_start is not None:
        tok_path, sft = args.warm_start / "tokenizer.json", args.warm_start / "sft.pt"
        say(f"warm start from {args.warm_start} (no tokenizer or SFT stage); work in {work}")
    else:
        say(f"tokenizer and SFT ({args.sft_steps} steps, the demo's recipe) into {work}")
        tok = stage_tokenizer(base, work)
        _, losses = stage_sft(base, tok, work, progress=False)
        tok_path, sft = work / "tokenizer.json", work / "sft.pt"
        say(f"SFT done in {time.perf_counter() - started:.0f} s (final loss {losses[-1]:.3f})")
    speedup = sampler_speedup(base, tok_path, sft, args.sampler_rows, args.rounds)
    init_ray(None, num_cpus=2)
    client = dsec.Client(address=server.address)
    per_step = base.grpo.prompts_per_step * base.grpo.group_size
    try:
        ratios, violations, runs = [], 0.0, {}
        shares: dict[int, list[dict[str, float]]] = {0: [], args.k: []}
        for rnd in range(args.rounds):
            rates = {}
            for k in (0, args.k):
                cfg = run_config(base, work / f"r{rnd}-k{k}", k)
                say(f"round {rnd + 1}/{args.rounds}: GRPO max_staleness={k}, {args.steps} steps x {per_step} samples")
                result = timed_run(cfg, tok_path, sft, server.address)
                rates[k], runs[k] = result["rate"], cfg
                violations += result["tito_violations"]
                shares[k].append(result)
                say(f"round {rnd + 1}: max_staleness={k}: {rates[k]:.3f} samples/s, learner busy "
                    f"{result['learner_busy']:.2f}, rollout wait {result['rollout_wait']:.2f} of the steps' wall, "
                    f"cores busy {result['cpu_busy']:.2f}")
            ratios.append(rates[args.k] / rates[0])
            say(f"round {rnd + 1}: async/sync = {ratios[-1]:.2f}")
        batches = []
        for rnd in range(args.rounds):
            say(f"batch {rnd + 1}/{args.rounds}: {args.rollouts} concurrent multi-turn rollouts through dsec "
                "(container sandboxes)")
            batches.append(concurrent_rollouts(args.rollouts, tok_path, sft, client, base))
            violations += batches[-1]["tito_violations"]
        conc = {key: statistics.median(b[key] for b in batches) for key in ("rollouts_per_s", "sandbox_wait_fraction")}
        spread = {key: f"{min(b[key] for b in batches):.{digits}f}-{max(b[key] for b in batches):.{digits}f}"
                  for key, digits in (("rollouts_per_s", 2), ("sandbox_wait_fraction", 3))}
        held = {"heldout_sft": "not_measured", "heldout_sync": "not_measured", "heldout_async": "not_measured",
                "heldout_async_minus_sync": "not_measured", "heldout_diff_ci95": "not_measured"}
        if not args.no_heldout:
            say(f"held-out success of the SFT, last sync and last async policies on {args.heldout} problems")
            scores = {tag: heldout_rewards(path, tok_path, client, base, tag) for tag, path in (
                ("sft", sft), ("sync", Path(runs[0].out_dir) / "learner.pt"),
                ("async", Path(runs[args.k].out_dir) / "learner.pt"))}
            diff, half = mean_ci95([a - s for a, s in zip(scores["async"], scores["sync"])])
            held = {"heldout_sft": interval(scores["sft"]), "heldout_sync": interval(scores["sync"]),
                    "heldout_async": interval(scores["async"]),
                    "heldout_async_minus_sync": f"{100 * diff:+.1f}",
                    "heldout_diff_ci95": f"[{100 * (diff - half):+.1f},{100 * (diff + half):+.1f}]"}
            say(f"held-out (n={args.heldout}, same problems and random streams): " + ", ".join(
                f"{k}={v}" for k, v in held.items()))
    finally:
        client.close()
        import ray

        ray.shutdown()
        server.stop()
    busy = {f"{name}_{key}": f"{statistics.fmean(r[key] for r in shares[k]):.2f}"
            for name, k in (("sync", 0), ("async", args.k)) for key in ("learner_busy", "rollout_wait", "cpu_busy")}
    # the most any overlap can gain: the sync run's work on every core all the time (same samples, same work)
    ceiling = statistics.fmean(1 / r["cpu_busy"] for r in shares[0])
    say(f"async/sync per round: {', '.join(f'{r:.2f}' for r in ratios)}; total {time.perf_counter() - started:.0f} s")
    fields = {"async_over_sync_throughput": f"{statistics.fmean(ratios):.2f}",
              "async_over_sync_range": f"{min(ratios):.2f}-{max(ratios):.2f}", "max_staleness": str(args.k),
              "async_cpu_ceiling": f"{ceiling:.2f}", **busy, "rollouts_per_s": f"{conc['rollouts_per_s']:.2f}",
              "rollouts_per_s_range": spread["rollouts_per_s"],
              "sandbox_wait_fraction": f"{conc['sandbox_wait_fraction']:.3f}",
              "sandbox_wait_range": spread["sandbox_wait_fraction"],
              "sampler_speedup": f"{speedup:.1f}", "tito_violations": f"{violations:.0f}", **held}
    report(fields)
    return 0


if __name__ == "__main__":
    sys.exit(main())
