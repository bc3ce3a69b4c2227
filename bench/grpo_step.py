"""GRPO step time: our trainer's sampler + learner vs TRL's GRPOTrainer, same tiny V4 model, task, batch and G.

Fair ground, both sides: fp32 (TRL's `bf16=False`), no activation recompute (TRL's `gradient_checkpointing=False`;
TRL 1.x turns both on by default), one optimizer step per batch of `prompts × G` completions from the same SFT
weights, the same β = 0.02 KL to the same reference. TRL generates with or without transformers' KV cache, whichever
generates the bench's batch faster in this run (`trl_generate_probe`: both timed, interleaved, before the steps;
the cache was the slower path for this model in an earlier transformers and is 3-9x faster with 5.23); ours decodes
incrementally (trainer/v4_decode.py). Both are scored by the same reward on text decoded with special
tokens kept (the DSML marker is a special token: TRL's own `completions` drop it, so the reward reads TRL's
`completion_ids`). The steps are interleaved (TRL step k, then ours on the same prompts, inside TRL's loop), so
machine noise hits both alike; each step is split into generation, log-prob forwards and backward.

Single turn, tools disabled (TRL's GRPOTrainer has no dsec tools): prompts are the arithmetic task's V4 prompts,
the reward is 1 if the completion is a well-formed DSML run_python call whose code prints the asked expression.
The bench checks that both sides did the task: TRL's mean reward > 0 and within noise of ours.

`heldout_gain_points` is measured in this run: the demo (SFT → held-out eval → GRPO → held-out eval, the committed
`tiny-cpu.yaml`) trains into a fresh directory once per seed of `--seeds` (default 0,1,2; the seed sets the
policy's init, the SFT batch order and every sampling stream; the 128 held-out problems are the same for all
seeds). Its value is the mean gain over the seeds, in points of held-out success; `heldout_gain_ci95` is the
95 % Student-t interval of that mean over the seeds (n - 1 degrees of freedom: with 3 seeds the half-width is
4.30 standard errors, so it reflects seed-to-seed spread, not only sampling noise within a run). `--no-heldout`
skips the demo runs and prints `not_measured` for both.

Last line: step_time_vs_trl=<ours/TRL> tokens_per_s=<ours> heldout_gain_points=<mean over seeds>
heldout_gain_ci95=[lo,hi].
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.harness import report
from trainer.config import AlgoConfig, ExperimentConfig, SFTConfig, load_config
from trainer.data import corpus, demo_pieces, problems, tokenize_pieces
from trainer.encoding import DSMLParseError, parse_assistant
from trainer.learner import Learner
from trainer.policy import build_policy
from trainer.rollout import Rollout, prompt_ids
from trainer.sampler import sample, sample_generator
from trainer.sft import train_sft
from trainer.tokenizer import V4Tokenizer, train

REPO = Path(__file__).resolve().parents[1]
PROMPTS, G, MAX_NEW, STEPS, WARMUP = 4, 4, 48, 4, 1


def reward_text(text: str, expr: str) -> float:
    try:
        turn = parse_assistant(text, "non-think")
    except DSMLParseError:
        return 0.0
    calls = [c for c in turn.tool_calls if c.name == "run_python"]
    code = calls[0].arguments.get("code", "") if calls else ""
    return 1.0 if isinstance(code, str) and code.replace(" ", "") == f"print({expr})".replace(" ", "") else 0.0


class PhaseClock:
    """Seconds per phase (generation, logprobs, backward) for whichever side is running now.

    Backward is timed by wrapping `torch.Tensor.backward` (both sides call it), generation by wrapping each side's
    generate call; what is left of a step is log-prob forwards, loss and optimizer step ("logprobs").
    """

    def __init__(self) -> None:
        self.seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.side = ""
        self._backward = torch.Tensor.backward

        clock = self

        def timed_backward(tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
            with clock.phase("backward"):
                return clock._backward(tensor, *args, **kwargs)

        torch.Tensor.backward = timed_backward  # type: ignore[method-assign]

    @contextmanager
    def phase(self, name: str):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[self.side][name] += time.perf_counter() - started

    def step(self, side: str, seconds: float) -> None:
        self.seconds[side]["step"] += seconds

    def report(self, side: str) -> str:
        s = self.seconds[side]
        rest = s["step"] - s["generation"] - s["backward"]
        return (f"{side}: generation {s['generation']:.1f} s, logprobs+loss+optimizer {rest:.1f} s, "
                f"backward {s['backward']:.1f} s (timed steps {s['step']:.1f} s)")


class Ours:
    """Our sampler + learner, one step per call on the batch TRL just trained on."""

    def __init__(self, model, tok: V4Tokenizer, algo: AlgoConfig, clock: PhaseClock) -> None:
        self.learner = Learner(model, algo, lr=3e-4, grad_clip=1.0, pad_id=tok.pad_id)
        self.tok, self.clock = tok, clock
        self.times: list[float] = []
        self.rewards: list[float] = []
        self.tokens = 0

    def step(self, step: int, batch) -> None:
        tok = self.tok
        self.clock.side = "ours"
        started = time.perf_counter()
        jobs = [(p, g) for p in batch for g in range(G)]
        prompts = [prompt_ids(tok, p, "non-think") for p, _ in jobs]
        gens = [sample_generator(0, step, p.id, g) for p, g in jobs]
        with self.clock.phase("generation"):
            outs = sample(self.learner.model, prompts, gens, max_new_tokens=[MAX_NEW] * len(jobs), eos_id=tok.eos_id,
                          pad_id=tok.pad_id)
        rewards = [reward_text(tok.decode(o), p.data["expr"]) for (p, _), o in zip(jobs, outs)]
        rollouts = [Rollout(f"bench/{step}/{p.id}/{g}", p.id, p.family, pr + o, [0] * len(pr) + [1] * len(o),
                            reward=r) for (p, g), pr, o, r in zip(jobs, prompts, outs, rewards)]
        self.learner.update(rollouts, G)
        elapsed = time.perf_counter() - started
        self.times.append(elapsed)
        if step >= WARMUP:
            self.clock.step("ours", elapsed)
            self.rewards += rewards
            self.tokens += sum(len(o) for o in outs)
        else:  # the warm-up step's phases are not part of the report
            self.clock.seconds["ours"].clear()


def trl_generate_probe(model, tok: V4Tokenizer, batch, rounds: int = 2) -> tuple[bool, dict[bool, float]]:
    """TRL's best generation setting for this model here: `generate` of the bench's batch (prompts × G, left-padded
    as TRL does, full length) timed with and without the KV cache, interleaved; returns (use_cache, best seconds of
    each). Measured in the run, so a transformers upgrade that speeds either path up is picked up."""
    hf_tok = tok.as_hf()
    hf_tok.padding_side = "left"
    texts = [tok.decode(prompt_ids(tok, p, "non-think")) for p in batch for _ in range(G)]
    enc = hf_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    best: dict[bool, float] = {False: math.inf, True: math.inf}
    with torch.no_grad():
        for _ in range(rounds):
            for use_cache in (False, True):
                started = time.perf_counter()
                model.generate(**enc, do_sample=True, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                               use_cache=use_cache, pad_token_id=tok.pad_id)
                best[use_cache] = min(best[use_cache], time.perf_counter() - started)
    return best[True] < best[False], best


def interleaved(model_ours, model_trl, tok: V4Tokenizer, batches, clock: PhaseClock, trl_use_cache: bool):
    """Run TRL's GRPOTrainer; after each of its steps, run ours on the same prompts. Returns (ours, TRL times, TRL rewards)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ours = Ours(model_ours, tok, AlgoConfig(kl_coef=0.02), clock)
    flat = [p for batch in batches for p in batch]
    hf_tok = tok.as_hf()
    data = Dataset.from_list([{"prompt": tok.decode(prompt_ids(tok, p, "non-think")), "expr": p.data["expr"]}
                              for p in flat])
    trl_rewards: list[float] = []
    trl_times: list[float] = []
    state = {"step": 0}

    def reward(completions, expr, completion_ids, **_):
        # Score the text with special tokens kept (TRL's `completions` drop them, and with them the DSML marker)
        scores = [reward_text(tok.decode(list(ids)), e) for ids, e in zip(completion_ids, expr)]
        if state["step"] >= WARMUP:
            trl_rewards.extend(scores)
        return scores

    model_trl.generation_config.use_cache = trl_use_cache
    model_trl.config.router_aux_loss_coef = 0.0  # our learner has no MoE aux loss either: same objective
    model_dir = Path(tempfile.mkdtemp(prefix="dsec-bench-trl-")) / "model"  # TRL builds its reference from a path
    model_trl.save_pretrained(model_dir)
    args = GRPOConfig(output_dir=str(model_dir.parent), per_device_train_batch_size=PROMPTS * G, num_generations=G,
                      max_completion_length=MAX_NEW, max_steps=len(batches), learning_rate=3e-4, beta=0.02,
                      loss_type="grpo", use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
                      shuffle_dataset=False, temperature=1.0, disable_dropout=True, seed=0,
                      bf16=False, fp16=False, gradient_checkpointing=False)

    class Interleave(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock.side = "trl"
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            elapsed = time.perf_counter() - self.t
            trl_times.append(elapsed)
            step = state["step"]
            if step >= WARMUP:
                clock.step("trl", elapsed)
            else:
                clock.seconds["trl"].clear()
            ours.step(step, batches[step])
            state["step"] = step + 1

    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=hf_tok, callbacks=[Interleave()])
    assert not trainer.args.bf16 and not trainer.args.gradient_checkpointing
    assert next(trainer.model.parameters()).dtype == torch.float32
    generate = trainer._generate

    def timed_generate(*a, **k):  # type: ignore[no-untyped-def]
        with clock.phase("generation"):
            return generate(*a, **k)

    trainer._generate = timed_generate  # type: ignore[method-assign]
    trainer.train()
    return ours, trl_times, trl_rewards


def within_noise(a: list[float], b: list[float]) -> tuple[bool, float]:
    """Two success rates agree when they differ by less than 3 standard errors of their difference."""
    pa, pb = statistics.mean(a), statistics.mean(b)
    pooled = (sum(a) + sum(b)) / (len(a) + len(b))
    se = math.sqrt(max(pooled * (1 - pooled), 1e-9) * (1 / len(a) + 1 / len(b)))
    return abs(pa - pb) <= 3 * se, se


# two-sided 95 % Student-t quantiles t(0.975, df); df > 10 uses the Cornish-Fisher expansion (error < 0.003)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t975(df: int) -> float:
    if df in T975:
        return T975[df]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95 % Student-t interval (lo, hi) over independent runs; needs two runs or more."""
    if len(values) < 2:
        raise ValueError(f"an interval over seeds needs at least 2 runs, got {len(values)}")
    mean = statistics.mean(values)
    half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def heldout_gains(cfg: ExperimentConfig, seeds: list[int]) -> list[dict]:
    """Train the demo once per seed, each into a fresh directory, and return each run's summary (measured here,
    never read back from an earlier run)."""
    from trainer.demo import run_demo

    summaries = []
    for seed in seeds:
        out = Path(tempfile.mkdtemp(prefix=f"dsec-bench-demo-s{seed}-"))
        s = run_demo(cfg.model_copy(update={"out_dir": str(out), "seed": seed}), progress=True)
        print(f"seed {seed}: held-out {s['heldout_before']} -> {s['heldout_after']}, "
              f"{s['heldout_gain_points']:+.1f} points; SFT {s['sft_s']:.0f} s, eval {s['eval_before_s']:.0f} s, "
              f"GRPO {s['grpo_s']:.0f} s, eval {s['eval_after_s']:.0f} s, total {s['total_s']:.0f} s", flush=True)
        summaries.append(s)
    return summaries


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs two or more distinct seeds for an interval, got {text!r}")
    return seeds


def main() -> None:
    parser = argparse.ArgumentParser(description="GRPO step time: ours vs TRL")
    parser.add_argument("--steps", type=int, default=STEPS, help="timed steps after one warm-up step")
    parser.add_argument("--sft-steps", type=int, help="SFT steps before the timed GRPO steps (default: the demo "
                        "config's; far fewer leave a policy that never earns a reward, and the bench refuses that)")
    parser.add_argument("--threads", type=int, help="torch threads for both trainers (default: the demo config's)")
    parser.add_argument("--no-heldout", action="store_true", help="skip the demo runs; heldout_gain_points and "
                        "heldout_gain_ci95 = not_measured")
    parser.add_argument("--seeds", type=parse_seeds, default=[0, 1, 2], help="demo runs' seeds (default 0,1,2)")
    args = parser.parse_args()
    cfg = load_config(REPO / "trainer" / "configs" / "tiny-cpu.yaml")
    torch.set_num_threads(args.threads or cfg.torch_threads)
    tok = train(corpus(["arithmetic"], 0, 300, "non-think"), 1024)
    base = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0)
    examples = [tokenize_pieces(tok, demo_pieces(p, "non-think")) for p in problems(["arithmetic"], "train", 500, 0)]
    sft_steps = args.sft_steps or cfg.sft.steps
    train_sft(base, examples, SFTConfig(steps=sft_steps, batch_size=cfg.sft.batch_size, lr=cfg.sft.lr), tok.pad_id, 0)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    pool = problems(["arithmetic"], "train", PROMPTS * (args.steps + WARMUP), 1000, start=0)
    batches = [pool[i * PROMPTS:(i + 1) * PROMPTS] for i in range(args.steps + WARMUP)]

    def fresh():  # type: ignore[no-untyped-def]
        model = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0)
        model.load_state_dict(state)
        return model

    model_trl = fresh()
    trl_use_cache, probe = trl_generate_probe(model_trl, tok, batches[0])
    print(f"TRL generation probe ({PROMPTS * G} x {MAX_NEW} tokens, best of 2): KV cache {probe[True]:.2f} s, "
          f"no cache {probe[False]:.2f} s -> TRL runs with use_cache={trl_use_cache}", flush=True)
    clock = PhaseClock()
    ours, trl_times, trl_rewards = interleaved(fresh(), model_trl, tok, batches, clock, trl_use_cache)
    ours_s = statistics.median(ours.times[WARMUP:])
    trl_s = statistics.median(trl_times[WARMUP:])
    print(f"ours: {[round(t, 2) for t in ours.times]} s/step; TRL GRPOTrainer: {[round(t, 2) for t in trl_times]} s/step")
    print(clock.report("ours"))
    print(clock.report("trl"))
    agree, se = within_noise(ours.rewards, trl_rewards)
    print(f"mean reward: ours {statistics.mean(ours.rewards):.3f}, TRL {statistics.mean(trl_rewards):.3f} "
          f"({len(ours.rewards)} completions each; 3 standard errors = {3 * se:.3f})")
    assert statistics.mean(trl_rewards) > 0, "TRL's completions never scored: the comparison would be empty"
    assert agree, "ours and TRL's rewards differ beyond noise on the same prompts: not the same task"
    gain, ci = "not_measured", "not_measured"
    if not args.no_heldout:
        runs = heldout_gains(cfg, args.seeds)
        mean, lo, hi = t_interval([s["heldout_gain_points"] for s in runs])
        gain, ci = f"{mean:.1f}", f"[{lo:.1f},{hi:.1f}]"
        print(f"held-out gain over seeds {args.seeds}: {[round(s['heldout_gain_points'], 1) for s in runs]} points; "
              f"demo wall time {[round(s['total_s']) for s in runs]} s", flush=True)
    report({"step_time_vs_trl": f"{ours_s / trl_s:.3f}",
            "tokens_per_s": f"{ours.tokens / sum(ours.times[WARMUP:]):.1f}", "heldout_gain_points": gain,
            "heldout_gain_ci95": ci})


if __name__ == "__main__":
    main()
