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
