"""Trainer kill -9 benchmark: many kills at random points of whole GRPO steps, each followed by --resume.

Runs tests/trainer/test_grpo_resume.py with its longer knobs (real Ray, real sandboxes, the tiny V4 policy): an
uninterrupted run of --steps steps, then the same run killed --kills times, each kill where the trainer holds at
a phase it reports (before the rollouts, after them, between the update and the save, after the metrics record,
after the checkpoint's commit, after the run state's update) or after the k-th logged tool call of the step, and
resumed after each. The test fails unless every step's metrics record and the final weights equal the
uninterrupted run's and the resumed run executed exactly as many tool calls as the uninterrupted one.

  kills                   kills that landed (fewer than asked only if the run finished first)
  reexecuted_tool_calls   tool calls the killed-and-resumed run executed beyond the uninterrupted run's (0)
  max_weight_diff         max abs difference of the final weights (0.0: bit-identical)
The last line is key=value pairs.

Usage: .venv/bin/python -m bench.trainer_resume [--kills 20] [--steps 8] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import report

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, help="kill plan seed (default: random, printed)")
    args = parser.parse_args()
    env = dict(os.environ, DSEC_RESUME_KILLS=str(args.kills), DSEC_RESUME_STEPS=str(args.steps))
    if args.seed is not None:
        env["DSEC_RESUME_SEED"] = str(args.seed)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           "tests/trainer/test_grpo_resume.py"], cwd=REPO, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    print(out[-6000:])
    kills = re.search(r"kills at: (.*)", out)
    counts = re.search(r"executed (\d+) tool calls \(uninterrupted (\d+)\)", out)
    diff = re.search(r"max abs weight difference resumed vs uninterrupted: (\S+)", out)
    if proc.returncode != 0 or not (kills and counts and diff):
        print(f"trainer_resume: the test failed (exit {proc.returncode})")
        return 1
    report({"resume_kills": len(kills.group(1).split("; ")),
            "reexecuted_tool_calls": int(counts.group(1)) - int(counts.group(2)), "max_weight_diff": diff.group(1),
            "seconds": f"{time.perf_counter() - started:.0f}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
