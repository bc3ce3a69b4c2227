"""On-policy distillation benchmark: the whole OPD recipe (trainer/opd.py) on CPU, bounded by its config.

Per family an expert (the student + SFT + GRPO on that family), the demo's SFT'd student distilled from both
experts on its own samples (tools through dsec), and beside it GRPO from the same student as the baseline (on
`recipe.grpo_steps`, a larger budget than OPD's, so its samples to the same score are timed).

    .venv/bin/python -m bench.opd [--config trainer/configs/opd-tiny-cpu.yaml] [--set recipe.steps=8 ...]

Last line: student_over_expert_min=<worst family's student/expert held-out score> (target ≥ 0.9)
samples_vs_grpo=<worst family's OPD samples / GRPO samples to the same target score> (target < 1; computed with
GRPO's whole budget when GRPO never reached the target, i.e. an upper bound). Report under the run's out_dir.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from bench.harness import report
from trainer.config import load_config
from trainer.opd import DEFAULT_CONFIG, OPDExperiment, run_recipe

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
    report({"student_over_expert_min": f"{s['student_over_expert_min']:.3f}",
            "samples_vs_grpo": f"{s['samples_vs_grpo']:.3f}"})


if __name__ == "__main__":
    main()
