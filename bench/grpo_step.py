"""GRPO step time: our trainer's sampler + learner vs TRL's GRPOTrainer, same tiny V4 model, task, batch and G.

Single turn, tools disabled (TRL's GRPOTrainer has no dsec tools): prompts are the arithmetic task's V4 prompts,
the reward is computed in-process from the completion (1 if it is a well-formed DSML run_python call whose code
evaluates the asked expression). Both start from the same SFT weights; both do one optimizer step per batch of
`prompts × G` completions. TRL generates with `use_cache=False`, the faster path for this model on CPU (see
trainer/sampler.py), so the comparison is not skewed by the cache. The held-out gain comes from the demo's
summary (runs/tiny-cpu/summary.json), produced by `python -m trainer.demo` (run here if missing).

Last line: step_time_vs_trl=<ours/TRL> tokens_per_s=<ours> heldout_gain_points=<demo>.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config import AlgoConfig, ExperimentConfig, SFTConfig, load_config  # noqa: E402
from trainer.data import corpus, demo_pieces, problems, tokenize_pieces  # noqa: E402
from trainer.encoding import DSMLParseError, parse_assistant  # noqa: E402
from trainer.learner import Learner  # noqa: E402
from trainer.policy import build_policy  # noqa: E402
from trainer.rollout import Rollout, prompt_ids  # noqa: E402
from trainer.sampler import sample, sample_generator  # noqa: E402
from trainer.sft import train_sft  # noqa: E402
from trainer.tokenizer import V4Tokenizer, train  # noqa: E402

PROMPTS, G, MAX_NEW, STEPS, WARMUP = 4, 4, 48, 4, 1


def reward_text(text: str, expr: str) -> float:
    try:
        turn = parse_assistant(text, "non-think")
    except DSMLParseError:
        return 0.0
    calls = [c for c in turn.tool_calls if c.name == "run_python"]
    code = calls[0].arguments.get("code", "") if calls else ""
    return 1.0 if isinstance(code, str) and code.replace(" ", "") == f"print({expr})".replace(" ", "") else 0.0


def ours(model, tok: V4Tokenizer, batches, algo: AlgoConfig) -> tuple[list[float], int]:
    learner = Learner(model, algo, lr=3e-4, grad_clip=1.0, pad_id=tok.pad_id)
    times, tokens = [], 0
    for step, batch in enumerate(batches):
        started = time.perf_counter()
        jobs = [(p, g) for p in batch for g in range(G)]
        prompts = [prompt_ids(tok, p, "non-think") for p, _ in jobs]
        gens = [sample_generator(0, step, p.id, g) for p, g in jobs]
        outs = sample(learner.model, prompts, gens, max_new_tokens=[MAX_NEW] * len(jobs), eos_id=tok.eos_id,
                      pad_id=tok.pad_id)
        rollouts = [Rollout(f"bench/{step}/{p.id}/{g}", p.id, p.family, pr + o, [0] * len(pr) + [1] * len(o),
                            reward=reward_text(tok.decode(o), p.data["expr"]))
                    for (p, g), pr, o in zip(jobs, prompts, outs)]
        learner.update(rollouts, G)
        times.append(time.perf_counter() - started)
        tokens += sum(len(o) for o in outs)
    return times, tokens


def trl_steps(model, tok: V4Tokenizer, batches) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    flat = [p for batch in batches for p in batch]
    hf_tok = tok.as_hf()
    data = Dataset.from_list([{"prompt": tok.decode(prompt_ids(tok, p, "non-think")), "expr": p.data["expr"]}
                              for p in flat])

    def reward(completions, expr, **_):
        return [reward_text(c, e) for c, e in zip(completions, expr)]

    model.generation_config.use_cache = False
    model.config.router_aux_loss_coef = 0.0  # our learner has no MoE aux loss either: same objective
    model_dir = "/tmp/dsec-bench-trl/model"  # TRL builds its reference model from a path: give it a local one
    model.save_pretrained(model_dir)
    args = GRPOConfig(output_dir="/tmp/dsec-bench-trl", per_device_train_batch_size=PROMPTS * G, num_generations=G,
                      max_completion_length=MAX_NEW, max_steps=len(batches), learning_rate=3e-4, beta=0.02,
                      loss_type="grpo", use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
                      shuffle_dataset=False, temperature=1.0, disable_dropout=True, seed=0)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=data, processing_class=hf_tok,
                          callbacks=[Timer()])
    trainer.train()
    return times


def heldout_gain(cfg: ExperimentConfig) -> float:
    summary = Path(cfg.out_dir) / "summary.json"
    if not summary.exists():
        from trainer.demo import run_demo

        run_demo(cfg, progress=False)
    return json.loads(summary.read_text())["heldout_gain_points"]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="GRPO step time: ours vs TRL")
    parser.add_argument("--steps", type=int, default=STEPS, help="timed steps after one warm-up step")
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--threads", type=int, help="torch threads for both trainers (default: the demo config's)")
    args = parser.parse_args()
    cfg = load_config(REPO / "trainer" / "configs" / "tiny-cpu.yaml")
    torch.set_num_threads(args.threads or cfg.torch_threads)
    tok = train(corpus(["arithmetic"], 0, 300, "non-think"), 1024)
    base = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0)
    examples = [tokenize_pieces(tok, demo_pieces(p, "non-think")) for p in problems(["arithmetic"], "train", 500, 0)]
    train_sft(base, examples, SFTConfig(steps=args.sft_steps, batch_size=16, lr=3e-3), tok.pad_id, 0)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    pool = problems(["arithmetic"], "train", PROMPTS * (args.steps + WARMUP), 1000, start=0)
    batches = [pool[i * PROMPTS:(i + 1) * PROMPTS] for i in range(args.steps + WARMUP)]

    model = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0)
    model.load_state_dict(state)
    algo = AlgoConfig(kl_coef=0.02)
    our_times, our_tokens = ours(model, tok, batches, algo)
    model = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 0)
    model.load_state_dict(state)
    their_times = trl_steps(model, tok, batches)
    ours_s = statistics.median(our_times[WARMUP:])
    trl_s = statistics.median(their_times[WARMUP:])
    print(f"ours: {[round(t, 2) for t in our_times]} s/step; TRL GRPOTrainer: {[round(t, 2) for t in their_times]} s/step")
    gain = heldout_gain(cfg)
    print(f"step_time_vs_trl={ours_s / trl_s:.3f} tokens_per_s={our_tokens / sum(our_times):.1f} "
          f"heldout_gain_points={gain:.1f}")


if __name__ == "__main__":
    main()
