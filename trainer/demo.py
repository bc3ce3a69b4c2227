"""The README demo on CPU: tokenizer → SFT → held-out eval → GRPO on Ray (tools via dsec) → held-out eval.

    .venv/bin/python -m trainer.demo [--config trainer/configs/tiny-cpu.yaml] [--grpo-steps N] [--seed S]

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

from trainer.config import ExperimentConfig, load_config
from trainer.evaluate import heldout_success
from trainer.grpo import train_grpo
from trainer.stages import stage_sft, stage_tokenizer

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny-cpu.yaml"


def run_demo(cfg: ExperimentConfig, progress: bool = True) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("state.json", "learner.pt", "metrics.jsonl"):
        (out / stale).unlink(missing_ok=True)
    started = time.perf_counter()
    stages: dict[str, float] = {}  # wall seconds a stage: how a run's time splits (docs/trainer.md uses them)
    mark = [started]

    def lap(name: str) -> None:
        now = time.perf_counter()
        stages[name], mark[0] = now - mark[0], now

    tok = stage_tokenizer(cfg, out)
    model, losses = stage_sft(cfg, tok, out, progress)
    lap("sft_s")
    with dsec.Client(address=cfg.sandbox.address) as client:
        tag = f"{cfg.run_name}-{int(time.time())}"
        before = heldout_success(model, tok, client, cfg, tag, "before", progress=progress)
        lap("eval_before_s")
        result = train_grpo(cfg, out / "tokenizer.json", out / "sft.pt", address=None, dsec_address=client.address,
                            resume=False, progress=progress)
        lap("grpo_s")
        state = torch.load(result["checkpoint"], weights_only=False)
        model.load_state_dict(state["model"])
        after = heldout_success(model, tok, client, cfg, tag, "after", progress=progress)
    lap("eval_after_s")
    gain = 100 * (after["success"] - before["success"])
    summary = {"seed": cfg.seed, "heldout_before": before, "heldout_after": after, "sft_final_loss": losses[-1],
               **stages, "total_s": mark[0] - started, "heldout_gain_points": gain}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--grpo-steps", type=int)
    parser.add_argument("--sft-steps", type=int)
    parser.add_argument("--seed", type=int, help="the run's seed (init, SFT order, sampling); held-out set unchanged")
    args = parser.parse_args()
    overrides: dict[str, object] = {}
    if args.grpo_steps is not None:
        overrides["grpo.steps"] = args.grpo_steps
    if args.sft_steps is not None:
        overrides["sft.steps"] = args.sft_steps
    if args.seed is not None:
        overrides["seed"] = args.seed
    cfg = load_config(args.config, overrides)
    s = run_demo(cfg)
    print(f"held-out success before GRPO: {s['heldout_before']['success']:.1%}  {s['heldout_before']}")
    print(f"held-out success after GRPO:  {s['heldout_after']['success']:.1%}  {s['heldout_after']}")
    print(f"gain: {s['heldout_gain_points']:+.1f} points; total {s['total_s']:.0f}s; "
          f"outputs in {cfg.out_dir} (metrics.jsonl, tb/, reward_curve.png)")


if __name__ == "__main__":
    main()
