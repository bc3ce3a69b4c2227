"""The README demo on CPU: tokenizer → SFT → held-out eval → GRPO on Ray (tools via dsec) → held-out eval.

    .venv/bin/python -m trainer.demo [--config trainer/configs/tiny-cpu.yaml] [--grpo-steps N]

Writes under the config's out_dir: tokenizer.json, sft.pt, metrics.jsonl, tb/, reward_curve.png, summary.json,
and prints the held-out success before and after GRPO.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import dsec
import torch
from tqdm import tqdm

from trainer.config import ExperimentConfig, load_config
from trainer.data import corpus, sft_examples
from trainer.evaluate import heldout_success
from trainer.grpo import train_grpo
from trainer.policy import build_policy
from trainer.sft import train_sft
from trainer.tokenizer import V4Tokenizer, train

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny-cpu.yaml"


def stage_tokenizer(cfg: ExperimentConfig, out: Path) -> V4Tokenizer:
    tok = train(corpus(cfg.tasks.families, cfg.tasks.seed, 400, cfg.rollout.thinking), cfg.policy.vocab_size)
    tok.save(out / "tokenizer.json")
    return tok


def stage_sft(cfg: ExperimentConfig, tok: V4Tokenizer, out: Path, progress: bool = True, init: Path | None = None):
    """SFT from random init, or from `init` (a state_dict file: e.g. an expert fine-tuned from the student)."""
    torch.set_num_threads(cfg.torch_threads)
    examples = sft_examples(tok, cfg.tasks.families, cfg.sft.examples, cfg.tasks.seed, cfg.rollout.thinking,
                            cfg.sft.direct_answer_fraction)
    model = build_policy(cfg.policy.name, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, cfg.seed)
    if init is not None:
        model.load_state_dict(torch.load(init, weights_only=True))
    bar = tqdm(total=cfg.sft.steps, desc="sft", disable=not progress)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    losses = train_sft(model, examples, cfg.sft, tok.pad_id, cfg.seed, on_step)
    bar.close()
    torch.save(model.state_dict(), out / "sft.pt")
    return model, losses


def run_demo(cfg: ExperimentConfig, progress: bool = True) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("state.json", "learner.pt", "metrics.jsonl"):
        (out / stale).unlink(missing_ok=True)
    started = time.perf_counter()
    tok = stage_tokenizer(cfg, out)
    model, losses = stage_sft(cfg, tok, out, progress)
    sft_s = time.perf_counter() - started
    with dsec.Client(address=cfg.sandbox.address) as client:
        tag = f"{cfg.run_name}-{int(time.time())}"
        before = heldout_success(model, tok, client, cfg, tag, "before", progress=progress)
        result = train_grpo(cfg, out / "tokenizer.json", out / "sft.pt", address=None, dsec_address=client.address,
                            resume=False, progress=progress)
        state = torch.load(result["checkpoint"], weights_only=False)
        model.load_state_dict(state["model"])
        after = heldout_success(model, tok, client, cfg, tag, "after", progress=progress)
    summary = {"heldout_before": before, "heldout_after": after, "sft_final_loss": losses[-1], "sft_s": sft_s,
               "total_s": time.perf_counter() - started,
               "heldout_gain_points": 100 * (after["success"] - before["success"])}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--grpo-steps", type=int)
    parser.add_argument("--sft-steps", type=int)
    args = parser.parse_args()
    overrides: dict[str, object] = {}
    if args.grpo_steps is not None:
        overrides["grpo.steps"] = args.grpo_steps
    if args.sft_steps is not None:
        overrides["sft.steps"] = args.sft_steps
    cfg = load_config(args.config, overrides)
    s = run_demo(cfg)
    print(f"held-out success before GRPO: {s['heldout_before']['success']:.1%}  {s['heldout_before']}")
    print(f"held-out success after GRPO:  {s['heldout_after']['success']:.1%}  {s['heldout_after']}")
    print(f"gain: {s['heldout_gain_points']:+.1f} points; total {s['total_s']:.0f}s; "
          f"outputs in {cfg.out_dir} (metrics.jsonl, tb/, reward_curve.png)")


if __name__ == "__main__":
    main()
