"""The OPD recipe's report: student vs expert per family with intervals, samples to a target score (OPD vs GRPO,
each at its best learning rate), and a plot.

Curves are lists of eval points (`eval_point`): `{"samples": n, "step": s, "scores": {family: success},
"ci95": {family: [lo, hi]}, "outcomes": {family: [reward per held-out problem]}}`, the first at 0 samples (the
SFT'd student). Every run scores the same held-out problems of a family in the same order with the same
per-problem sampling seed, so the student's and the expert's outcomes pair up problem by problem: a rate gets
a Wilson interval, student/expert a paired bootstrap one (trainer/opd_stats.py).

A family's target is min(0.9 × expert score, the student's final OPD score): the issue's bar when OPD clears
it, otherwise the score OPD did reach. "Samples to target" is the first eval point at or above it; a GRPO curve
that never gets there is reported as not reached, and its ratio uses the whole GRPO budget (so the ratio is then
an upper bound of the true one: `samples_vs_grpo_is_upper_bound`). A family whose expert scores 0, whose
student OPD did not improve, or whose student met the target before any training has no ratio (nan): there is
no race to time. `samples_vs_grpo_with_experts` adds what making the experts cost (their SFT examples, steps ×
batch size, and their GRPO samples; all experts, since the one student learns from all of them) to OPD's side.

Learning rates: each side ran at every lr of the grid; OPD's best is the lr with the highest worst-family
student/expert, GRPO's the one that reaches OPD's targets in the fewest samples (the largest worst-family
ratio; ties: an exact ratio over a bound, then the higher final mean score). Both are picked on the held-out
scores they are reported on, the same optimism on both sides.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.opd_stats import paired_ratio_ci, wilson

TARGET_FRACTION = 0.9  # the bar: student ≥ 0.9 × expert


@dataclass(frozen=True)
class ExpertCost:
    """What making one expert took, in the units both recipes are charged in (one sample = one sequence in a
    training step): SFT steps × batch size, and GRPO steps × prompts × group size."""

    sft_examples: int = 0
    grpo_samples: int = 0

    @property
    def total(self) -> int:
        return self.sft_examples + self.grpo_samples


def eval_point(step: int, samples: int, outcomes: dict[str, list[float]]) -> dict:
    """One point of a curve: per family the success rate, its Wilson 95 % interval and the outcomes."""
    return {"step": step, "samples": samples,
            "scores": {f: sum(v) / len(v) if v else math.nan for f, v in outcomes.items()},
            "ci95": {f: list(wilson(v)) for f, v in outcomes.items()},
            "outcomes": {f: list(v) for f, v in outcomes.items()}}


def samples_to(curve: list[dict], family: str, target: float) -> int | None:
    """Samples at the first eval point whose score for `family` reaches `target` (None: never)."""
    for point in curve:
        if point["scores"][family] >= target - 1e-9:
            return int(point["samples"])
    return None


def _worst_bound(families: dict[str, dict], key: str) -> tuple[float, bool]:
    """The largest timed `key` over families and whether it is an upper bound (GRPO never reached); on a tie
    the exactly timed family is the worst: its ratio is exact, the other's is at most the same."""
    timed = [f for f in families.values() if not math.isnan(f[key])]
    if not timed:
        return math.nan, False
    worst = max(timed, key=lambda f: (f[key], f["grpo_reached"]))
    return worst[key], not worst["grpo_reached"]


def compare(experts: dict[str, list[float]], opd: list[dict], grpo: list[dict],
            expert_cost: dict[str, ExpertCost]) -> dict:
    """Per-family figures of one OPD curve against one GRPO curve, and the headline numbers (worst family)."""
    all_experts = sum(c.total for c in expert_cost.values())
    families: dict[str, dict] = {}
    for family, expert_outcomes in experts.items():
        expert = sum(expert_outcomes) / len(expert_outcomes)
        final = opd[-1]
        student = final["scores"][family]
        target = min(TARGET_FRACTION * expert, student)
        opd_n = samples_to(opd, family, target)
        grpo_n = samples_to(grpo, family, target)
        denominator = grpo_n if grpo_n is not None else int(grpo[-1]["samples"])
        if expert <= 0 or opd_n is None or opd_n == 0 or student <= opd[0]["scores"][family]:
            # no expert signal to distil, OPD gained nothing, or the student met the target before training
            # (both runs need 0 samples: 0/0): no race to time
            ratio = with_experts = math.nan
        else:
            ratio, with_experts = opd_n / denominator, (opd_n + all_experts) / denominator
        cost = expert_cost.get(family, ExpertCost())
        families[family] = {
            "eval_size": len(expert_outcomes),
            "expert": expert,
            "expert_ci95": list(wilson(expert_outcomes)),
            "student_opd": student,
            "student_opd_ci95": final["ci95"][family],
            "student_grpo": grpo[-1]["scores"][family],
            "student_grpo_ci95": grpo[-1]["ci95"][family],
            "student_before": opd[0]["scores"][family],
            "student_before_ci95": opd[0]["ci95"][family],
            "student_over_expert": student / expert if expert > 0 else math.nan,
            "student_over_expert_ci95": list(paired_ratio_ci(final["outcomes"][family], expert_outcomes)),
            "target": target,
            "opd_samples_to_target": opd_n,
            "grpo_samples_to_target": grpo_n,
            "grpo_reached": grpo_n is not None,
            "samples_vs_grpo": ratio,
            "samples_vs_grpo_with_experts": with_experts,
            "expert_training_samples": cost.total,
            "expert_sft_examples": cost.sft_examples,
            "expert_grpo_samples": cost.grpo_samples,
        }
    rated = {f: v for f, v in families.items() if not math.isnan(v["student_over_expert"])}
    worst_family = min(rated, key=lambda f: rated[f]["student_over_expert"]) if rated else None
    ratio, bound = _worst_bound(families, "samples_vs_grpo")
    with_experts, with_experts_bound = _worst_bound(families, "samples_vs_grpo_with_experts")
    return {
        "families": families,
        "student_over_expert_min": rated[worst_family]["student_over_expert"] if worst_family else math.nan,
        "student_over_expert_min_family": worst_family,
        "student_over_expert_min_ci95": (rated[worst_family]["student_over_expert_ci95"] if worst_family
                                         else [math.nan, math.nan]),
        "samples_vs_grpo": ratio,
        # GRPO never reached the worst family's target: its whole budget stood in for the samples it would need
        "samples_vs_grpo_is_upper_bound": bound,
        "samples_vs_grpo_with_experts": with_experts,
        "samples_vs_grpo_with_experts_is_upper_bound": with_experts_bound,
        "expert_training_samples_total": all_experts,
        "families_without_expert_signal": [f for f, v in families.items() if v["expert"] <= 0],
    }


def _mean_final(curve: list[dict]) -> float:
    scores = list(curve[-1]["scores"].values())
    return sum(scores) / len(scores)


def summarize(experts: dict[str, list[float]], opd_runs: dict[float, list[dict]],
              grpo_runs: dict[float, list[dict]], expert_cost: dict[str, ExpertCost]) -> dict:
    """The figures at each side's best learning rate (module docstring), and every (side, lr, score)."""
    def opd_key(lr: float) -> tuple[float, float]:
        final = opd_runs[lr][-1]["scores"]
        ratios = [final[f] / (sum(v) / len(v)) for f, v in experts.items() if v and sum(v) > 0]
        return (min(ratios) if ratios else -math.inf, _mean_final(opd_runs[lr]))

    opd_lr = max(opd_runs, key=opd_key)
    races = {lr: compare(experts, opd_runs[opd_lr], curve, expert_cost) for lr, curve in grpo_runs.items()}

    def grpo_key(lr: float) -> tuple[float, bool, float]:
        ratio = races[lr]["samples_vs_grpo"]
        return (-math.inf if math.isnan(ratio) else ratio, not races[lr]["samples_vs_grpo_is_upper_bound"],
                _mean_final(grpo_runs[lr]))

    grpo_lr = max(grpo_runs, key=grpo_key)
    search = [{"side": "opd", "lr": lr, "final_mean": _mean_final(c), "final": c[-1]["scores"],
               "student_over_expert_min": opd_key(lr)[0]} for lr, c in opd_runs.items()]
    search += [{"side": "grpo", "lr": lr, "final_mean": _mean_final(c), "final": c[-1]["scores"],
                "samples_vs_grpo": races[lr]["samples_vs_grpo"],
                "samples_vs_grpo_is_upper_bound": races[lr]["samples_vs_grpo_is_upper_bound"]}
               for lr, c in grpo_runs.items()]
    for row in search:
        row["chosen"] = row["lr"] == (opd_lr if row["side"] == "opd" else grpo_lr)
    return races[grpo_lr] | {"opd_lr": opd_lr, "grpo_lr": grpo_lr, "lr_search": search,
                             "expert_cost": {f: asdict(c) for f, c in expert_cost.items()}}


def headline(summary: dict) -> dict[str, str]:
    """The benchmark's key=value figures; a bound says so in its own key, so no reader takes it as measured."""
    lo, hi = summary["student_over_expert_min_ci95"]
    return {"student_over_expert_min": f"{summary['student_over_expert_min']:.3f}",
            "student_over_expert_min_ci95": f"[{lo:.3f},{hi:.3f}]",
            "samples_vs_grpo": f"{summary['samples_vs_grpo']:.3f}",
            "samples_vs_grpo_bound": str(summary["samples_vs_grpo_is_upper_bound"]).lower(),
            "samples_vs_grpo_with_experts": f"{summary['samples_vs_grpo_with_experts']:.3f}",
            "samples_vs_grpo_with_experts_bound": str(summary["samples_vs_grpo_with_experts_is_upper_bound"]).lower()}


def _ci(value: float, ci: list[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def write_report(out: Path, summary: dict, opd_runs: dict[float, list[dict]], grpo_runs: dict[float, list[dict]],
                 meta: dict) -> None:
    """report.json (everything), report.md (the tables) and opd_vs_grpo.png under `out`."""
    opd, grpo = opd_runs[summary["opd_lr"]], grpo_runs[summary["grpo_lr"]]
    (out / "report.json").write_text(json.dumps({
        **summary, "opd_curve": opd, "grpo_curve": grpo,
        "opd_curves": [{"lr": lr, "curve": c} for lr, c in opd_runs.items()],
        "grpo_curves": [{"lr": lr, "curve": c} for lr, c in grpo_runs.items()], **meta}, indent=1))
    budget = grpo[-1]["samples"]
    bound = (f"; **an upper bound**: GRPO did not reach the target in its {budget} samples"
             if summary["samples_vs_grpo_is_upper_bound"] else "")
    bound_x = "; an upper bound" if summary["samples_vs_grpo_with_experts_is_upper_bound"] else ""
    le = "≤ " if summary["samples_vs_grpo_is_upper_bound"] else ""
    le_x = "≤ " if summary["samples_vs_grpo_with_experts_is_upper_bound"] else ""
    lines = [
        "# OPD recipe report",
        "",
        (f"- student/expert (worst family, {summary['student_over_expert_min_family'] or 'none with expert signal'}): "
         f"**{summary['student_over_expert_min']:.3f}**, 95 % paired-bootstrap interval "
         f"[{summary['student_over_expert_min_ci95'][0]:.3f}, {summary['student_over_expert_min_ci95'][1]:.3f}] "
         "(target ≥ 0.9)"),
        (f"- OPD samples / GRPO samples to the target (worst family): **{le}{summary['samples_vs_grpo']:.3f}** "
         f"(target < 1{bound})"),
        (f"- the same with the experts' own training samples ({summary['expert_training_samples_total']}) "
         f"on OPD's side: **{le_x}{summary['samples_vs_grpo_with_experts']:.3f}**{bound_x}"),
        f"- learning rates: OPD {summary['opd_lr']:g}, GRPO {summary['grpo_lr']:g} (each side's best of its grid)",
        f"- wall time: {meta.get('total_s', 0):.0f} s; stages: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in meta.get("stage_s", {}).items())
        + ("; OPD and GRPO trained side by side, so their times overlap" if meta.get("concurrent_runs") else ""),
        "",
        "Scores are held-out success rates with Wilson 95 % intervals; student/expert with a paired bootstrap one.",
        "",
        ("| family | problems | expert | student before | student OPD | student GRPO | student/expert | target | "
         "OPD samples | GRPO samples | expert samples (SFT + GRPO) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family, f in summary["families"].items():
        grpo_n = f["grpo_samples_to_target"] if f["grpo_reached"] else f"not reached in {budget}"
        lines.append(f"| {family} | {f['eval_size']} | {_ci(f['expert'], f['expert_ci95'])} | "
                     f"{_ci(f['student_before'], f['student_before_ci95'])} | "
                     f"{_ci(f['student_opd'], f['student_opd_ci95'])} | "
                     f"{_ci(f['student_grpo'], f['student_grpo_ci95'])} | "
                     f"{_ci(f['student_over_expert'], f['student_over_expert_ci95'])} | {f['target']:.3f} | "
                     f"{f['opd_samples_to_target']} | {grpo_n} | "
                     f"{f['expert_sft_examples']} + {f['expert_grpo_samples']} |")
    lines += ["", "| side | lr | final mean | per family | chosen |", "|---|---|---|---|---|"]
    for row in summary["lr_search"]:
        per = ", ".join(f"{k} {v:.3f}" for k, v in row["final"].items())
        lines.append(f"| {row['side']} | {row['lr']:g} | {row['final_mean']:.3f} | {per} | "
                     f"{'yes' if row['chosen'] else ''} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot(out / "opd_vs_grpo.png", summary, opd, grpo)


def plot(png: Path, summary: dict, opd: list[dict], grpo: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(summary["families"])
    fig, axes = plt.subplots(1, len(families), figsize=(4.5 * len(families), 3.2), squeeze=False)
    for ax, family in zip(axes[0], families):
        for name, curve in (("OPD", opd), ("GRPO", grpo)):
            xs = [p["samples"] for p in curve]
            ax.plot(xs, [p["scores"][family] for p in curve], marker="o", label=name)
            ax.fill_between(xs, [p["ci95"][family][0] for p in curve], [p["ci95"][family][1] for p in curve],
                            alpha=0.15)
        ax.axhline(summary["families"][family]["expert"], color="gray", linestyle="--", label="expert")
        ax.set_title(family)
        ax.set_xlabel("student samples")
        ax.set_ylabel("held-out success (95 % band)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
