"""The OPD recipe's config (inherits the tuned experiment via `base:`) and its report arithmetic and plot."""

from __future__ import annotations

import json
import math
import os
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
    _Stages,
    _train_curves,
)
from trainer.opd_report import samples_to, summarize, write_report
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


def _curve(points: list[tuple[int, float, float]]) -> list[dict]:
    return [{"step": i, "samples": n, "scores": {"a": a, "b": b}} for i, (n, a, b) in enumerate(points)]


def test_summary_targets_ratios_and_report_files(tmp_path: Path):
    opd = _curve([(0, 0.0, 0.5), (16, 0.5, 0.75), (32, 0.75, 0.875)])
    grpo = _curve([(0, 0.0, 0.5), (16, 0.25, 0.5), (32, 0.5, 0.875)])
    s = summarize({"a": 0.75, "b": 1.0}, opd, grpo, {"a": 64, "b": 64})
    a, b = s["families"]["a"], s["families"]["b"]
    assert a["target"] == pytest.approx(0.675) and a["opd_samples_to_target"] == 32 and not a["grpo_reached"]
    assert a["samples_vs_grpo"] == 1.0  # GRPO never got there: its whole budget is the denominator (upper bound)
    assert b["target"] == pytest.approx(0.875) and b["grpo_samples_to_target"] == 32 and b["samples_vs_grpo"] == 1.0
    assert s["student_over_expert_min"] == pytest.approx(0.875)
    assert samples_to(grpo, "b", 0.5) == 0 and samples_to(grpo, "a", 0.9) is None
    assert not s["samples_vs_grpo_is_upper_bound"]  # tied at 1.0: b's is exact, a's (never reached) at most 1.0
    write_report(tmp_path, s, opd, grpo, {"total_s": 1.0, "stage_s": {"opd": 1.0}, "concurrent_runs": True})
    assert json.loads((tmp_path / "report.json").read_text())["grpo_curve"] == grpo
    report = (tmp_path / "report.md").read_text()
    assert "| a | 0.750 |" in report and "side by side" in report and "upper bound" not in report
    assert (tmp_path / "opd_vs_grpo.png").read_bytes()[:4] == b"\x89PNG"


def test_a_family_whose_expert_scores_zero_is_flagged_not_counted():
    curve = _curve([(0, 0.0, 0.5), (16, 0.0, 0.75)])
    s = summarize({"a": 0.0, "b": 0.75}, curve, curve, {})
    assert math.isnan(s["families"]["a"]["student_over_expert"]) and s["families_without_expert_signal"] == ["a"]
    assert s["student_over_expert_min"] == 1.0 and math.isnan(s["families"]["a"]["samples_vs_grpo"])
    assert s["samples_vs_grpo"] == 1.0  # b: both runs reach the target at 16 samples


def test_a_family_at_the_target_before_training_has_no_sample_ratio(tmp_path: Path):
    """Both runs need 0 samples (0/0): such a family must not pin the worst-family ratio at a 'tie' of 1.0."""
    opd = _curve([(0, 0.25, 0.9), (16, 0.75, 0.95), (32, 0.75, 0.95)])
    grpo = _curve([(0, 0.25, 0.9), (16, 0.25, 0.9), (32, 0.5, 0.7)])
    s = summarize({"a": 0.8, "b": 1.0}, opd, grpo, {})
    assert s["families"]["b"]["opd_samples_to_target"] == 0 and math.isnan(s["families"]["b"]["samples_vs_grpo"])
    assert s["families"]["a"]["samples_vs_grpo"] == 0.5 and s["samples_vs_grpo"] == 0.5
    assert s["samples_vs_grpo_is_upper_bound"]  # GRPO never reached a's target: its 32 samples stand in
    write_report(tmp_path, s, opd, grpo, {"total_s": 1.0, "stage_s": {}})
    assert "an upper bound: GRPO did not reach the target in its 32 samples" in (tmp_path / "report.md").read_text()


def test_no_opd_gain_means_no_sample_ratio():
    curve = _curve([(0, 0.25, 0.5), (16, 0.25, 0.5)])
    s = summarize({"a": 1.0, "b": 1.0}, curve, curve, {})
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
                   "grpo_steps": 2, "eval_every": 1, "eval_size": 1, "opd_grpo": {"prompts_per_step": 2, "group_size": 1}}}))
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DSEC_RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(repo))
    done = subprocess.run([sys.executable, "-m", "trainer.opd", str(cfg), "--no-progress"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "student_over_expert_min=" in done.stdout.splitlines()[-1]
    report = json.loads((out / "report.json").read_text())
    assert set(report["families"]) == {"arithmetic", "fix_module"}
    # OPD for recipe.steps, the GRPO baseline for recipe.grpo_steps (side by side)
    assert [c["step"] for c in report["opd_curve"]] == [0, 1] and [c["step"] for c in report["grpo_curve"]] == [0, 1, 2]
    # OPD ran its own batch shape (2 prompts x 1 sample), the GRPO baseline the experiment's (1 prompt x 2)
    assert report["opd_curve"][1]["samples"] == 2 and report["grpo_curve"][2]["samples"] == 4
    cursors = {run: json.loads((out / run / "state.json").read_text())["cursor"] for run in ("opd", "grpo")}
    assert cursors == {"opd": 64 + 2, "grpo": 64 + 2}  # prompts after the 64 SFT problems
    assert list(report["stage_s"])[:3] == ["tokenizer", "student: sft", "expert arithmetic: sft"]
    assert (out / "opd_vs_grpo.png").stat().st_size > 0
    # Each expert starts from the student's weights: two SFT steps leave it far closer to them than a fresh init.
    student = torch.load(out / "student" / "sft.pt", weights_only=True)
    tok = V4Tokenizer.load(out / "tokenizer.json")
    fresh = build_policy("v4-tiny", tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, 1).state_dict()
    for family in ("arithmetic", "fix_module"):
        expert = torch.load(out / "experts" / family / "sft.pt", weights_only=True)
        to_student = max((expert[k] - student[k]).abs().max().item() for k in student)
        to_fresh = max((fresh[k] - student[k]).abs().max().item() for k in student if k in fresh)
        assert to_student < to_fresh / 10, (family, to_student, to_fresh)
