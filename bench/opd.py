"""On-policy distillation benchmark: the whole OPD recipe (trainer/opd.py) on CPU, bounded by its config.

Per family an expert (the student + SFT + GRPO on that family), the demo's SFT'd student distilled from all
experts on its own samples (tools through dsec), and beside it GRPO from the same student as the baseline (on
`recipe.grpo_steps`, a larger budget than OPD's, so its samples to the same score are timed); with
`recipe.lr_grid`, both sides at every lr of the grid and each reported at its best (trainer/opd_report.py).

    .venv/bin/python -m bench.opd [--config trainer/configs/opd-tiny-cpu.yaml] [--set recipe.steps=8 ...]

Last line (`recipe.eval_size` held-out problems per family, scored alike for every policy):
  student_over_expert_min       the worst family's student/expert held-out score (target >= 0.9), and
  student_over_expert_min_ci95  its 95 % paired-bootstrap interval (same problems, same per-problem seeds)
  samples_vs_grpo               the worst family's OPD samples / GRPO samples to the same target score (target < 1)
  samples_vs_grpo_bound         true: GRPO never reached the target, its whole budget is the denominator, and the
                                figure is an upper bound of the true ratio, not a measurement of it
  samples_vs_grpo_with_experts  the same with the experts' own training samples (SFT examples + GRPO samples) added
                                to OPD's side; _bound as above
Report (per-family rates with Wilson intervals, every (side, lr, score)) under the run's out_dir.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from bench.harness import report
from trainer.config import load_config
from trainer.opd import DEFAULT_CONFIG, OPDExperiment, run_recipe
from trainer.opd_report import headline

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = {"out_dir": str(REPO / "runs" / "bench-opd")}
    overrides |= {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    exp = load_config(args.config, overrides, model=OPDExperiment)
    s = run_recipe(exp)
    print((Path(exp.out_dir) / "report.md").read_text())
    report(headline(s))


if __name__ == "__main__":
    main()
