"""The OPD recipe's report: student vs expert per family, samples to a target score (OPD vs GRPO), and a plot.

Curves are lists of eval points `{"samples": n, "step": s, "scores": {family: success}}`, the first at 0
samples (the SFT'd student). A family's target is min(0.9 × expert score, the student's final OPD score): the
issue's bar when OPD clears it, otherwise the score OPD did reach. "Samples to target" is the first eval point
at or above it; a GRPO curve that never gets there within the same budget is reported as not reached, and its
ratio uses the whole GRPO budget (so the ratio printed is then an upper bound of the true one). A family whose
expert scores 0, whose student OPD did not improve, or whose student met the target before any training has no
ratio (nan): there is no race to time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

TARGET_FRACTION = 0.9  # the bar: student ≥ 0.9 × expert


def samples_to(curve: list[dict], family: str, target: float) -> int | None:
    """Samples at the first eval point whose score for `family` reaches `target` (None: never)."""
    for point in curve:
        if point["scores"][family] >= target - 1e-9:
            return int(point["samples"])
    return None


def summarize(experts: dict[str, float], opd: list[dict], grpo: list[dict], expert_samples: dict[str, int]) -> dict:
    """Per-family figures and the two benchmark numbers (worst family for each)."""
    families: dict[str, dict] = {}
    for family, expert in experts.items():
        student = opd[-1]["scores"][family]
        target = min(TARGET_FRACTION * expert, student)
        opd_n = samples_to(opd, family, target)
        grpo_n = samples_to(grpo, family, target)
        denominator = grpo_n if grpo_n is not None else int(grpo[-1]["samples"])
        if expert <= 0 or opd_n is None or opd_n == 0 or student <= opd[0]["scores"][family]:
            # no expert signal to distil, OPD gained nothing, or the student met the target before training
            # (both runs need 0 samples: 0/0): no race to time
            ratio = math.nan
        else:
            ratio = opd_n / denominator
        families[family] = {
            "expert": expert,
            "student_opd": student,
            "student_grpo": grpo[-1]["scores"][family],
            "student_before": opd[0]["scores"][family],
            "student_over_expert": student / expert if expert > 0 else math.nan,
            "target": target,
            "opd_samples_to_target": opd_n,
            "grpo_samples_to_target": grpo_n,
            "grpo_reached": grpo_n is not None,
            "samples_vs_grpo": ratio,
            "expert_training_samples": expert_samples.get(family, 0),
        }
    ratios = [f["student_over_expert"] for f in families.values() if not math.isnan(f["student_over_expert"])]
    timed = [f for f in families.values() if not math.isnan(f["samples_vs_grpo"])]
    # on a tie the exactly timed family is the worst: its ratio is exact, the other's is at most the same
    worst = max(timed, key=lambda f: (f["samples_vs_grpo"], f["grpo_reached"])) if timed else None
    return {
        "families": families,
        "student_over_expert_min": min(ratios) if ratios else math.nan,
        "samples_vs_grpo": worst["samples_vs_grpo"] if worst else math.nan,
        # GRPO never reached the worst family's target: its whole budget stood in for the samples it would need
        "samples_vs_grpo_is_upper_bound": bool(worst and not worst["grpo_reached"]),
        "families_without_expert_signal": [f for f, v in families.items() if v["expert"] <= 0],
    }


def write_report(out: Path, summary: dict, opd: list[dict], grpo: list[dict], meta: dict) -> None:
    """report.json (everything), report.md (the table) and opd_vs_grpo.png under `out`."""
    (out / "report.json").write_text(json.dumps({**summary, "opd_curve": opd, "grpo_curve": grpo, **meta},
                                                indent=2))
    bound = (f"; an upper bound: GRPO did not reach the target in its {grpo[-1]['samples']} samples"
             if summary.get("samples_vs_grpo_is_upper_bound") else "")
    lines = [
        "# OPD recipe report",
        "",
        f"- student/expert (worst family): **{summary['student_over_expert_min']:.3f}** (target ≥ 0.9)",
        (f"- OPD samples / GRPO samples to the target (worst family): **{summary['samples_vs_grpo']:.3f}** "
         f"(target < 1{bound})"),
        f"- wall time: {meta.get('total_s', 0):.0f} s; stages: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in meta.get("stage_s", {}).items())
        + ("; OPD and GRPO trained side by side, so their times overlap" if meta.get("concurrent_runs") else ""),
        "",
        ("| family | expert | student before | student OPD | student GRPO | student/expert | target | "
         "OPD samples | GRPO samples | expert samples |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family, f in summary["families"].items():
        grpo_n = f["grpo_samples_to_target"] if f["grpo_reached"] else f"not reached in {grpo[-1]['samples']}"
        lines.append(f"| {family} | {f['expert']:.3f} | {f['student_before']:.3f} | {f['student_opd']:.3f} | "
                     f"{f['student_grpo']:.3f} | {f['student_over_expert']:.3f} | {f['target']:.3f} | "
                     f"{f['opd_samples_to_target']} | {grpo_n} | {f['expert_training_samples']} |")
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
            ax.plot([p["samples"] for p in curve], [p["scores"][family] for p in curve], marker="o", label=name)
        ax.axhline(summary["families"][family]["expert"], color="gray", linestyle="--", label="expert")
        ax.set_title(family)
        ax.set_xlabel("student samples")
        ax.set_ylabel("held-out success")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
