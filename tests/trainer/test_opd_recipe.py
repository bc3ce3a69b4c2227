"""The OPD recipe's config (inherits the tuned experiment via `base:`) and its report arithmetic and plot."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

import trainer.opd
from trainer.config import load_config
from trainer.opd import (
    DEFAULT_CONFIG,
    OPDExperiment,
    RunAborted,
    _lr_pairs,
    _side_configs,
    _Stages,
    _train_curves,
)
from trainer.opd_report import ExpertCost, eval_point, headline, samples_to, summarize, write_report
from trainer.opd_stats import paired_ratio_ci, wilson
from trainer.policy import build_policy
from trainer.tokenizer import V4Tokenizer


def test_recipe_config_inherits_the_base_experiment_and_takes_overrides():
    exp = load_config(DEFAULT_CONFIG, {"recipe.steps": 3, "grpo.group_size": 2}, model=OPDExperiment)
    base = load_config(DEFAULT_CONFIG.parent / "tiny-cpu.yaml")
    assert exp.policy == base.policy and exp.rollout == base.rollout and exp.sft == base.sft
    assert exp.run_name == "opd-tiny-cpu" and exp.recipe.steps == 3 and exp.grpo.group_size == 2
    one = exp.experiment(**{"tasks.families": ["fix_module"], "sft.steps": 7})
    assert one.tasks.families == ["fix_module"] and one.sft.steps == 7 and not hasattr(one, "recipe")
    assert exp.tasks.families == base.tasks.families  # the recipe itself is untouched
    with pytest.raises(ValueError, match="kl_estimator"):
        load_config(DEFAULT_CONFIG, {"recipe.opd.kl_estimator": "forward"}, model=OPDExperiment)


def test_opd_run_takes_its_own_grpo_section_and_the_baseline_keeps_the_experiment_one():
    exp = load_config(DEFAULT_CONFIG, {"recipe.opd_grpo": {"lr": 0.002, "group_size": 1, "prompts_per_step": 32},
                                       "recipe.steps": 5}, model=OPDExperiment)
    opd = exp.opd_grpo()
    assert (opd.lr, opd.group_size, opd.prompts_per_step, opd.steps) == (0.002, 1, 32, 5)
    assert exp.grpo.group_size > 1 and exp.grpo.lr != 0.002  # GRPO from the student: unchanged
    assert opd.freeze == exp.grpo.freeze  # what opd_grpo does not name is inherited
    with pytest.raises(ValueError, match="lrr"):
        load_config(DEFAULT_CONFIG, {"recipe.opd_grpo": {"lrr": 0.1}}, model=OPDExperiment)
    with pytest.raises(ValueError, match="grpo_steps=4 < recipe.steps=8"):
        load_config(DEFAULT_CONFIG, {"recipe.steps": 8, "recipe.grpo_steps": 4}, model=OPDExperiment)
    with pytest.raises(ValueError, match="group_size >= 2"):
        load_config(DEFAULT_CONFIG, {"recipe.opd_grpo": {"group_size": 1}, "recipe.opd.reward_weight": 0.5},
                    model=OPDExperiment)


def test_side_by_side_runs_stop_together_and_raise_the_real_failure(monkeypatch):
    """OPD and the GRPO baseline train in two threads: when one fails, the other stops at its next step and
    the recipe raises the first run's own error, not the sibling's RunAborted."""
    steps: dict[str, int] = {}

    def fake_curve_run(exp, name, cfg, tok, tok_path, init, client, start, progress, abort=None):
        for step in range(1, 200):
            if abort is not None and abort.is_set():
                raise RunAborted(name)
            steps[name] = step
            if name == "opd" and step == 3:
                raise ValueError("teacher checkpoint missing")
            time.sleep(0.01)
        return [{"step": 0}]

    monkeypatch.setattr(trainer.opd, "_curve_run", fake_curve_run)
    monkeypatch.setattr(trainer.opd.ray, "is_initialized", lambda: True)
    exp = load_config(DEFAULT_CONFIG, model=OPDExperiment)
    runs = {"student: opd": ("opd", None), "student: grpo from scratch": ("grpo", None)}
    with pytest.raises(ValueError, match="teacher checkpoint missing"):
        _train_curves(exp, runs, None, Path("t"), Path("i"), None, {}, _Stages(False), False)
    assert steps["opd"] == 3 and steps["grpo"] < 50  # the baseline did not run on to its 199 steps
    assert not [t for t in threading.enumerate() if t.name.startswith("curve")]  # both threads joined
    # one after the other when asked: each run in order, no threads
    exp = load_config(DEFAULT_CONFIG, {"recipe.concurrent_runs": False}, model=OPDExperiment)
    steps.clear()
    with pytest.raises(ValueError, match="teacher checkpoint missing"):
        _train_curves(exp, runs, None, Path("t"), Path("i"), None, {}, _Stages(False), False)
    assert steps == {"opd": 3}


N = 40  # held-out problems per family in the report tests: every rate below is a whole number of them


def _outcomes(rate: float, n: int = N) -> list[float]:
    return [1.0] * round(rate * n) + [0.0] * (n - round(rate * n))


def _curve(points: list[tuple[int, float, float]]) -> list[dict]:
    return [eval_point(i, n, {"a": _outcomes(a), "b": _outcomes(b)}) for i, (n, a, b) in enumerate(points)]


def _experts(a: float, b: float) -> dict[str, list[float]]:
    return {"a": _outcomes(a), "b": _outcomes(b)}


def test_summary_targets_ratios_and_report_files(tmp_path: Path):
    opd = _curve([(0, 0.0, 0.5), (16, 0.5, 0.75), (32, 0.75, 0.875)])
    grpo = _curve([(0, 0.0, 0.5), (16, 0.25, 0.5), (32, 0.5, 0.875)])
    cost = {"a": ExpertCost(sft_examples=48, grpo_samples=16), "b": ExpertCost(sft_examples=48, grpo_samples=16)}
    s = summarize(_experts(0.75, 1.0), {1e-3: opd}, {5e-4: grpo}, cost)
    a, b = s["families"]["a"], s["families"]["b"]
    assert a["target"] == pytest.approx(0.675) and a["opd_samples_to_target"] == 32 and not a["grpo_reached"]
    assert a["samples_vs_grpo"] == 1.0  # GRPO never got there: its whole budget is the denominator (upper bound)
    assert b["target"] == pytest.approx(0.875) and b["grpo_samples_to_target"] == 32 and b["samples_vs_grpo"] == 1.0
    assert s["student_over_expert_min"] == pytest.approx(0.875) and s["student_over_expert_min_family"] == "b"
    assert samples_to(grpo, "b", 0.5) == 0 and samples_to(grpo, "a", 0.9) is None
    assert not s["samples_vs_grpo_is_upper_bound"]  # tied at 1.0: b's is exact, a's (never reached) at most 1.0
    # the experts' own samples (both experts: the one student learns from both) charged to OPD: (32 + 128) / 32
    assert s["expert_training_samples_total"] == 128 and s["samples_vs_grpo_with_experts"] == pytest.approx(5.0)
    assert a["expert_training_samples"] == 64 and (a["expert_sft_examples"], a["expert_grpo_samples"]) == (48, 16)
    # intervals: every rate a Wilson interval around it, the ratio a paired-bootstrap one around the point
    for f in (a, b):
        assert f["eval_size"] == N
        for key in ("expert", "student_opd", "student_grpo", "student_before"):
            lo, hi = f[f"{key}_ci95"]
            assert 0.0 <= lo <= f[key] <= hi <= 1.0, (key, lo, f[key], hi)
    lo, hi = s["student_over_expert_min_ci95"]
    assert lo < 0.875 < hi and s["student_over_expert_min_ci95"] == b["student_over_expert_ci95"]
    assert (s["opd_lr"], s["grpo_lr"]) == (1e-3, 5e-4) and [r["side"] for r in s["lr_search"]] == ["opd", "grpo"]
    write_report(tmp_path, s, {1e-3: opd}, {5e-4: grpo}, {"total_s": 1.0, "stage_s": {"opd": 1.0},
                                                            "concurrent_runs": True})
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["grpo_curve"] == grpo and saved["opd_curves"] == [{"lr": 1e-3, "curve": opd}]
    report = (tmp_path / "report.md").read_text()
    assert "| a | 40 | 0.750 [" in report and "side by side" in report and "upper bound" not in report
    assert "| opd | 0.001 | 0.812 |" in report and "| grpo | 0.0005 | 0.688 |" in report
    assert (tmp_path / "opd_vs_grpo.png").read_bytes()[:4] == b"\x89PNG"


def test_wilson_and_paired_bootstrap_intervals():
    lo, hi = wilson([1.0] * 109 + [0.0] * 19)  # 109/128 = 0.852
    assert (round(lo, 3), round(hi, 3)) == (0.780, 0.903)
    assert wilson([1.0] * 10) == (pytest.approx(0.722, abs=1e-3), 1.0) and wilson([0.0] * 10)[0] == 0.0
    assert all(math.isnan(x) for x in wilson([]))
    # the same outcomes on both sides: every resample's ratio is exactly 1
    same = _outcomes(0.7)
    assert paired_ratio_ci(same, same) == (1.0, 1.0)
    # pairing: the student solves exactly the expert's problems but one (27 of 28), so a resample falls below 1
    # only as often as it draws that problem: [0.88, 1.0]; resampling the two sides apart gives about [0.70, 1.29]
    student = list(same)
    student[0] = 0.0
    lo, hi = paired_ratio_ci(student, same)
    assert 0.85 < lo < 27 / 28 and hi == 1.0 and paired_ratio_ci(student, same) == (lo, hi)  # seeded
    assert all(math.isnan(x) for x in paired_ratio_ci([1.0], [0.0])) and math.isnan(paired_ratio_ci([1.0], [])[0])


def test_each_side_is_reported_at_its_best_learning_rate():
    """Equal lr search: OPD's best has the highest worst-family student/expert, GRPO's reaches OPD's target in
    the fewest samples; every (side, lr) is listed."""
    experts = _experts(1.0, 1.0)
    opd = {1e-3: _curve([(0, 0.5, 0.5), (16, 0.9, 0.9), (32, 0.95, 0.9)]),
           2e-3: _curve([(0, 0.5, 0.5), (16, 0.95, 0.7), (32, 1.0, 0.75)])}
    grpo = {1e-3: _curve([(0, 0.5, 0.5), (16, 0.5, 0.5), (32, 0.9, 0.9)]),
            2e-3: _curve([(0, 0.5, 0.5), (16, 0.9, 0.9), (32, 0.9, 0.9)]),
            4e-3: _curve([(0, 0.5, 0.5), (16, 0.7, 0.7), (32, 0.75, 0.7)])}
    s = summarize(experts, opd, grpo, {})
    assert s["opd_lr"] == 1e-3 and s["student_over_expert_min"] == pytest.approx(0.9)  # not 2e-3's 0.75
    assert s["grpo_lr"] == 2e-3 and s["samples_vs_grpo"] == 1.0 and not s["samples_vs_grpo_is_upper_bound"]
    rows = {(r["side"], r["lr"]): r for r in s["lr_search"]}
    assert len(rows) == 5 and rows[("grpo", 1e-3)]["samples_vs_grpo"] == 0.5
    assert rows[("grpo", 4e-3)]["samples_vs_grpo_is_upper_bound"] and rows[("opd", 2e-3)]["final_mean"] == 0.875
    assert [r["lr"] for r in s["lr_search"] if r["chosen"]] == [1e-3, 2e-3]


def test_headline_says_when_the_sample_ratio_is_a_bound():
    opd = _curve([(0, 0.25, 0.9), (16, 0.75, 0.95), (32, 0.75, 0.95)])
    grpo = _curve([(0, 0.25, 0.9), (16, 0.25, 0.9), (32, 0.5, 0.7)])
    s = summarize(_experts(0.8, 1.0), {1e-3: opd}, {1e-3: grpo}, {"a": ExpertCost(8, 8), "b": ExpertCost(8, 8)})
    line = headline(s)
    assert line["samples_vs_grpo"] == "0.500" and line["samples_vs_grpo_bound"] == "true"
    assert line["samples_vs_grpo_with_experts"] == "1.500" and line["samples_vs_grpo_with_experts_bound"] == "true"
    lo, hi = (float(x) for x in line["student_over_expert_min_ci95"].strip("[]").split(","))
    assert lo <= float(line["student_over_expert_min"]) <= hi


def test_lr_grid_runs_both_sides_at_every_lr_and_without_one_each_sides_own():
    exp = load_config(DEFAULT_CONFIG, model=OPDExperiment)  # the bench's config: equal search over both sides' lrs
    assert exp.recipe.eval_size == 256 and sorted(exp.recipe.lr_grid) == sorted({exp.opd_grpo().lr, exp.grpo.lr})
    assert _lr_pairs(exp) == [(5e-4, 5e-4, "-lr0.0005"), (1e-3, 1e-3, "-lr0.001")]
    exp = load_config(DEFAULT_CONFIG, {"recipe.lr_grid": None}, model=OPDExperiment)
    assert _lr_pairs(exp) == [(exp.opd_grpo().lr, exp.grpo.lr, "")]
    runs = _side_configs(exp, Path("/tmp/x"), {"arithmetic": Path("e.pt")}, 1e-3, 1e-3, "-lr0.001")
    (opd_name, opd_cfg), (grpo_name, grpo_cfg) = runs.values()
    assert (opd_name, grpo_name) == ("opd-lr0.001", "grpo-lr0.001")
    assert opd_cfg.grpo.lr == grpo_cfg.grpo.lr == 1e-3
    assert opd_cfg.algorithm().opd is not None and grpo_cfg.algorithm().opd is None
    assert opd_cfg.grpo.updates_per_step == exp.opd_grpo().updates_per_step  # only the lr differs from opd_grpo
    for bad in ([], [0.0], [1e-3, 1e-3]):
        with pytest.raises(ValueError, match="lr_grid"):
            load_config(DEFAULT_CONFIG, {"recipe.lr_grid": bad}, model=OPDExperiment)


def test_a_family_whose_expert_scores_zero_is_flagged_not_counted():
    curve = _curve([(0, 0.0, 0.5), (16, 0.0, 0.75)])
    s = summarize(_experts(0.0, 0.75), {1e-3: curve}, {1e-3: curve}, {})
    assert math.isnan(s["families"]["a"]["student_over_expert"]) and s["families_without_expert_signal"] == ["a"]
    assert s["student_over_expert_min"] == 1.0 and math.isnan(s["families"]["a"]["samples_vs_grpo"])
    assert s["samples_vs_grpo"] == 1.0  # b: both runs reach the target at 16 samples


def test_a_family_at_the_target_before_training_has_no_sample_ratio(tmp_path: Path):
    """Both runs need 0 samples (0/0): such a family must not pin the worst-family ratio at a 'tie' of 1.0."""
    opd = _curve([(0, 0.25, 0.9), (16, 0.75, 0.95), (32, 0.75, 0.95)])
    grpo = _curve([(0, 0.25, 0.9), (16, 0.25, 0.9), (32, 0.5, 0.7)])
    s = summarize(_experts(0.8, 1.0), {1e-3: opd}, {1e-3: grpo}, {})
    assert s["families"]["b"]["opd_samples_to_target"] == 0 and math.isnan(s["families"]["b"]["samples_vs_grpo"])
    assert s["families"]["a"]["samples_vs_grpo"] == 0.5 and s["samples_vs_grpo"] == 0.5
    assert s["samples_vs_grpo_is_upper_bound"]  # GRPO never reached a's target: its 32 samples stand in
    write_report(tmp_path, s, {1e-3: opd}, {1e-3: grpo}, {"total_s": 1.0, "stage_s": {}})
    report = (tmp_path / "report.md").read_text()
    assert "**≤ 0.500**" in report and "an upper bound**: GRPO did not reach the target in its 32 samples" in report


def test_no_opd_gain_means_no_sample_ratio():
    curve = _curve([(0, 0.25, 0.5), (16, 0.25, 0.5)])
    s = summarize(_experts(1.0, 1.0), {1e-3: curve}, {1e-3: curve}, {})
    assert math.isnan(s["samples_vs_grpo"]) and s["student_over_expert_min"] == 0.25


def test_recipe_runs_end_to_end_with_experts_fine_tuned_from_the_student(tmp_path: Path, dsec_server, ray_tmp):
    """The whole command at toy size: student SFT first, experts from its weights, OPD and GRPO, the report."""
    out = tmp_path / "run"
    cfg = tmp_path / "opd.yaml"
    cfg.write_text(yaml.safe_dump({
        "base": str(DEFAULT_CONFIG), "out_dir": str(out), "sandbox": {"address": dsec_server.address},
        "sft": {"examples": 64}, "rollout": {"max_new_tokens": 40, "max_total_tokens": 400},
        "grpo": {"prompts_per_step": 1, "group_size": 2},
        "recipe": {"student_sft_steps": 3, "expert_sft_steps": 2, "expert_grpo_steps": 0, "steps": 1,
                   "grpo_steps": 2, "eval_every": 1, "eval_size": 1, "opd_grpo": {"prompts_per_step": 2, "group_size": 1},
                   "lr_grid": [0.001, 0.002]}}))
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DSEC_RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(repo))
    done = subprocess.run([sys.executable, "-m", "trainer.opd", str(cfg), "--no-progress"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    line = dict(item.split("=", 1) for item in done.stdout.splitlines()[-1].split())
    assert set(line) == {"student_over_expert_min", "student_over_expert_min_ci95", "samples_vs_grpo",
                         "samples_vs_grpo_bound", "samples_vs_grpo_with_experts", "samples_vs_grpo_with_experts_bound"}
    number = r"(\d+\.\d{3}|nan)"
    assert re.fullmatch(rf"\[{number},{number}\]", line["student_over_expert_min_ci95"]), line
    assert {line["samples_vs_grpo_bound"], line["samples_vs_grpo_with_experts_bound"]} <= {"true", "false"}
    report = json.loads((out / "report.json").read_text())
    families = report["families"]
    assert set(report["families"]) == {"arithmetic", "fix_module", "fix_repo"}
    # OPD for recipe.steps, the GRPO baseline for recipe.grpo_steps (side by side)
    assert [c["step"] for c in report["opd_curve"]] == [0, 1] and [c["step"] for c in report["grpo_curve"]] == [0, 1, 2]
    # OPD ran its own batch shape (2 prompts x 1 sample), the GRPO baseline the experiment's (1 prompt x 2)
    assert report["opd_curve"][1]["samples"] == 2 and report["grpo_curve"][2]["samples"] == 4
    # recipe.lr_grid: both sides trained at both learning rates, each reported at its best
    runs = [f"{side}-lr{lr}" for side in ("opd", "grpo") for lr in ("0.001", "0.002")]
    cursors = {run: json.loads((out / run / "state.json").read_text())["cursor"] for run in runs}
    assert cursors == dict.fromkeys(runs, 64 + 2)  # prompts after the 64 SFT problems
    assert sorted((r["side"], r["lr"]) for r in report["lr_search"]) == [
        ("grpo", 0.001), ("grpo", 0.002), ("opd", 0.001), ("opd", 0.002)]
    assert sorted(r["side"] for r in report["lr_search"] if r["chosen"]) == ["grpo", "opd"]
    assert {report["opd_lr"], report["grpo_lr"]} <= {0.001, 0.002} and len(report["opd_curves"]) == 2
    # every held-out score with its 95 % interval, on eval_size problems per family scored alike
    for f in families.values():
        assert f["eval_size"] == 1 and f["expert_sft_examples"] == 2 * 16 and f["expert_grpo_samples"] == 0
        for key in ("expert", "student_before", "student_opd", "student_grpo"):
            assert 0.0 <= f[f"{key}_ci95"][0] <= f[key] <= f[f"{key}_ci95"][1] <= 1.0, (key, f)
        assert len(f["student_over_expert_ci95"]) == 2
    assert report["expert_training_samples_total"] == 2 * 16 * len(families)
    assert all(len(v) == 1 for c in report["opd_curve"] + report["grpo_curve"] for v in c["outcomes"].values())
    assert list(report["stage_s"])[:3] == ["tokenizer", "student: sft", "expert arithmetic: sft"]
    assert (out / "opd_vs_grpo.png").stat().st_size > 0
    # Each expert starts from the student's weights: two SFT steps leave it far closer to them than a fresh init.
    student = torch.load(out / "student" / "sft.pt", weights_only=True)
    tok = V4Tokenizer.load(out / "tokenizer.json")
    fresh = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 1).state_dict()
    for family in ("arithmetic", "fix_module", "fix_repo"):
        expert = torch.load(out / "experts" / family / "sft.pt", weights_only=True)
        to_student = max((expert[k] - student[k]).abs().max().item() for k in student)
        to_fresh = max((fresh[k] - student[k]).abs().max().item() for k in student if k in fresh)
        assert to_student < to_fresh / 10, (family, to_student, to_fresh)
