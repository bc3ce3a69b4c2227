"""The on-policy distillation recipe on CPU: experts per family → student SFT → OPD, against GRPO from scratch.

    .venv/bin/python -m trainer.opd [CONFIG] [--set recipe.steps=4 ...] [--no-progress]

1. The student: the experiment's SFT on every family (the demo's warm start, `recipe.student_sft_steps`).
2. One expert per task family: the existing SFT + GRPO path on that family only, started from the student's SFT
   weights (`recipe.experts_from_student`, as V4's specialists start from a common base) on the family's
   tool-using demonstrations only (`recipe.expert_direct_answer_fraction`); or `recipe.experts` given.
3. OPD: the GRPO driver loop with `algo.opd` (teachers = the experts, routed by task tag), held-out eval every
   `recipe.eval_every` steps; beside it GRPO from the same student (`recipe.grpo_steps`, at least OPD's budget),
   evaluated alike. With `recipe.lr_grid` both sides run at every lr of the grid (one OPD/GRPO pair at a time).
4. report.json / report.md / opd_vs_grpo.png under out_dir (trainer/opd_report.py): each side at its best lr.
Why the comparison starts both runs from the same SFT'd student: it isolates what the teachers' dense signal
buys over the sparse reward, per sample.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import ray
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

import dsec
from trainer.config import ExperimentConfig, GRPOConfig, OPDConfig, load_config
from trainer.data import problems
from trainer.grpo import init_ray, train_grpo
from trainer.opd_report import ExpertCost, eval_point, headline, summarize, write_report
from trainer.policy import build_policy
from trainer.rollout import run_rollouts
from trainer.stages import stage_sft, stage_tokenizer
from trainer.teachers import load_weights
from trainer.tokenizer import V4Tokenizer

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "opd-tiny-cpu.yaml"
EVAL_BATCH = 16  # held-out rollouts sampled together (as trainer/evaluate.py)


class RecipeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expert_sft_steps: int = 500
    expert_sft_lr: float | None = None  # None: the experiment's sft.lr
    expert_direct_answer_fraction: float = Field(default=0.0, ge=0.0, le=1.0)  # the specialist's curated data
    experts_from_student: bool = True  # expert SFT starts from the student's SFT weights (else random init)
    expert_grpo_steps: int = 8
    student_sft_steps: int = 150
    steps: int = 12  # OPD steps
    # The GRPO-from-scratch baseline's steps (None: `steps`). Longer than OPD's, "GRPO samples to the same score"
    # is measured instead of being cut off at OPD's budget (a GRPO that never gets there gives an upper bound)
    grpo_steps: int | None = None
    eval_every: int = 4
    eval_size: int = Field(default=256, ge=1)  # held-out problems per family
    eval_greedy: bool = True  # deterministic scores: the small eval is not drowned in sampling noise
    experts: dict[str, Path] = Field(default_factory=dict)  # family -> given expert weights: not trained here
    opd: OPDConfig = Field(default_factory=OPDConfig)  # estimator, λ, reward weight (teachers: the experts)
    ref_kl_coef: float = 0.0  # KL to the SFT'd student during OPD (off: the teacher is the anchor)
    # The OPD run's changes to the experiment's grpo section (the GRPO baseline keeps it as tuned for GRPO): the
    # dense per-token signal tolerates a larger lr and several optimizer steps per batch, and needs no group of
    # samples per prompt (group_size 1 spreads the same samples over more prompts)
    opd_grpo: dict[str, Any] = Field(default_factory=dict)
    # Equal learning-rate search: OPD and the GRPO baseline each train at every lr listed and the report takes
    # each side's best (trainer/opd_report.py). None: each side at its own lr only (OPD: opd_grpo's, the
    # baseline: the experiment's grpo.lr), which costs no extra runs
    lr_grid: list[float] | None = None
    # OPD and the GRPO baseline train side by side (each run's actors and evals are one torch thread: on 2 cores
    # this halves the recipe's longest stage); false runs them one after the other
    concurrent_runs: bool = True


class OPDExperiment(ExperimentConfig):
    """An experiment YAML (usually `base: tiny-cpu.yaml`) plus the recipe section."""

    recipe: RecipeConfig = Field(default_factory=RecipeConfig)

    @model_validator(mode="after")
    def _opd_grpo_is_valid(self) -> OPDExperiment:
        opd = self.opd_grpo()
        if self.recipe.grpo_steps is not None and self.recipe.grpo_steps < self.recipe.steps:
            raise ValueError(f"recipe.grpo_steps={self.recipe.grpo_steps} < recipe.steps={self.recipe.steps}: the "
                             "GRPO baseline needs at least OPD's budget to time the race to the same score")
        grid = self.recipe.lr_grid
        if grid is not None and (not grid or min(grid) <= 0 or len(set(grid)) != len(grid)):
            raise ValueError(f"recipe.lr_grid={grid}: list distinct learning rates > 0, or leave it unset")
        if self.recipe.opd.reward_weight > 0 and opd.group_size < 2:
            raise ValueError(f"recipe.opd.reward_weight={self.recipe.opd.reward_weight} mixes in the group-"
                             f"normalised reward, which needs recipe.opd_grpo group_size >= 2 (got {opd.group_size})")
        return self

    def opd_grpo(self) -> GRPOConfig:
        """The OPD run's grpo section: the experiment's, with `recipe.opd_grpo` applied (validated: no typos)."""
        return GRPOConfig.model_validate(self.grpo.model_dump() | self.recipe.opd_grpo | {"steps": self.recipe.steps})

    def experiment(self, **update: object) -> ExperimentConfig:
        data = self.model_dump(exclude={"recipe"})
        return ExperimentConfig.model_validate(_deep_update(data, update))


def _deep_update(data: dict, update: dict) -> dict:
    for dotted, value in update.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return data


class _Stages:
    """Timing per stage, printed as it goes (the recipe runs for minutes)."""

    def __init__(self, progress: bool) -> None:
        self.seconds: dict[str, float] = {}
        self.progress = progress

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.progress:
            print(f"== {name}", flush=True)
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        return result


def _evaluate(model: torch.nn.Module, tok: V4Tokenizer, client: dsec.Client, cfg: ExperimentConfig,
              families: list[str], size: int, greedy: bool, tag: str) -> dict[str, list[float]]:
    """Per family, the reward of each of its first `size` held-out problems, in order. A rollout's sampling RNG
    is keyed by its trajectory id past the run component (trainer/rollout.py), here `eval/<family>/<index>`: every
    policy evaluated samples problem k of a family with the same seed, so two policies' outcomes pair up."""
    rollout_cfg = cfg.rollout.model_copy(update={"temperature": 0.0}) if greedy else cfg.rollout
    run_id = f"{cfg.run_name}-{time.time_ns()}-{tag}"
    jobs = [(f"{run_id}/eval/{f}/{k}", p) for f in families
            for k, p in enumerate(problems([f], "heldout", size, cfg.tasks.seed))]
    outcomes: dict[str, list[float]] = {f: [] for f in families}
    for start in range(0, len(jobs), EVAL_BATCH):
        for r in run_rollouts(model, tok, client, jobs[start:start + EVAL_BATCH], rollout_cfg, cfg.sandbox, cfg.seed):
            outcomes[r.family].append(r.reward)
    return outcomes


def train_expert(exp: OPDExperiment, family: str, tok: V4Tokenizer, tok_path: Path, dsec_address: str,
                 stages: _Stages, progress: bool, init: Path | None = None) -> Path:
    """SFT (from `init` if given) then GRPO on one family only; returns the expert's weights file."""
    out = Path(exp.out_dir) / "experts" / family
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("state.json", "learner.pt", "metrics.jsonl"):
        (out / stale).unlink(missing_ok=True)
    r = exp.recipe
    cfg = exp.experiment(**{"out_dir": str(out), "run_name": f"{exp.run_name}-expert-{family}",
                            "tasks.families": [family], "sft.steps": r.expert_sft_steps,
                            "sft.lr": exp.sft.lr if r.expert_sft_lr is None else r.expert_sft_lr,
                            "sft.direct_answer_fraction": r.expert_direct_answer_fraction,
                            "grpo.steps": r.expert_grpo_steps})
    stages.run(f"expert {family}: sft", stage_sft, cfg, tok, out, progress, init)
    if r.expert_grpo_steps == 0:
        return out / "sft.pt"
    result = stages.run(f"expert {family}: grpo", train_grpo, cfg, tok_path, out / "sft.pt", address=None,
                        dsec_address=dsec_address, resume=False, progress=progress)
    return Path(result["checkpoint"])


class RunAborted(RuntimeError):
    """A curve run stopped because the run beside it failed (its own error is the one raised)."""


def _curve_run(exp: OPDExperiment, name: str, cfg: ExperimentConfig, tok: V4Tokenizer, tok_path: Path,
               init: Path, client: dsec.Client, start: dict[str, list[float]], progress: bool,
               abort: threading.Event | None = None) -> list[dict]:
    """Train with the GRPO driver (GRPO or OPD by `cfg.algo`), evaluating every `eval_every` steps; stops after
    the current step once `abort` is set."""
    r = exp.recipe
    families = cfg.tasks.families
    per_step = cfg.grpo.prompts_per_step * cfg.grpo.group_size
    curve = [eval_point(0, 0, start)]
    model = build_policy(cfg.policy.name, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, cfg.seed).eval()

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if abort is not None and abort.is_set():
            raise RunAborted(f"{name} stopped at step {step}: the run beside it failed")
        if step % r.eval_every and step != cfg.grpo.steps:
            return
        model.load_state_dict(load_weights(Path(cfg.out_dir) / "learner.pt"))
        outcomes = _evaluate(model, tok, client, cfg, families, r.eval_size, r.eval_greedy, f"{name}-{step}")
        curve.append(eval_point(step, step * per_step, outcomes))
        if progress:
            print(f"   {name} step {step} ({step * per_step} samples): {curve[-1]['scores']}", flush=True)

    for stale in ("state.json", "learner.pt", "metrics.jsonl"):
        (Path(cfg.out_dir) / stale).unlink(missing_ok=True)
    train_grpo(cfg, tok_path, init, address=None, dsec_address=client.address, resume=False, progress=progress,
               on_step=on_step)
    return curve


def _train_curves(exp: OPDExperiment, runs: dict[str, tuple[str, ExperimentConfig]], tok: V4Tokenizer,
                  tok_path: Path, init: Path, client: dsec.Client, start: dict[str, list[float]], stages: _Stages,
                  progress: bool) -> dict[str, list[dict]]:
    """Each run's eval curve (stage name -> curve): side by side in threads sharing one Ray and one dsec server
    (`recipe.concurrent_runs`), or one after the other. If one run fails, the other stops after its current step
    and the first failure is raised."""
    if not exp.recipe.concurrent_runs:
        return {stage: stages.run(stage, _curve_run, exp, name, cfg, tok, tok_path, init, client, start, progress)
                for stage, (name, cfg) in runs.items()}
    if not ray.is_initialized():
        init_ray(None)  # once, before the threads: both drivers share it
    abort = threading.Event()

    def one(stage: str, name: str, cfg: ExperimentConfig) -> list[dict]:
        try:
            return stages.run(stage, _curve_run, exp, name, cfg, tok, tok_path, init, client, start, progress, abort)
        except BaseException:
            abort.set()
            raise

    with ThreadPoolExecutor(max_workers=len(runs), thread_name_prefix="curve") as pool:
        futures = {stage: pool.submit(one, stage, name, cfg) for stage, (name, cfg) in runs.items()}
        wait(futures.values())
    errors = [f.exception() for f in futures.values() if f.exception() is not None]
    if errors:
        raise next((e for e in errors if not isinstance(e, RunAborted)), errors[0])
    return {stage: f.result() for stage, f in futures.items()}


def run_recipe(exp: OPDExperiment, progress: bool = True) -> dict:
    """The whole recipe; returns the summary (also written to out_dir/report.json)."""
    out = Path(exp.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stages = _Stages(progress)
    r = exp.recipe
    families = exp.tasks.families
    torch.set_num_threads(exp.torch_threads)
    tok = stages.run("tokenizer", stage_tokenizer, exp.experiment(), out)
    tok_path = out / "tokenizer.json"
    try:
        with dsec.Client(address=exp.sandbox.address) as client:
            student_dir = out / "student"
            student_dir.mkdir(exist_ok=True)
            student, _ = stages.run("student: sft", stage_sft, exp.experiment(**{"sft.steps": r.student_sft_steps}),
                                    tok, student_dir, progress)
            init = student_dir / "sft.pt" if r.experts_from_student else None
            experts = {f: Path(r.experts[f]) if f in r.experts else
                       train_expert(exp, f, tok, tok_path, client.address, stages, progress, init) for f in families}
            teacher = build_policy(exp.policy.name, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, exp.seed)
            expert_outcomes: dict[str, list[float]] = {}
            for f in families:
                teacher.load_state_dict(load_weights(experts[f]))
                expert_outcomes.update(stages.run(f"expert {f}: eval", _evaluate, teacher.eval(), tok, client,
                                                  exp.experiment(), [f], r.eval_size, r.eval_greedy, f"expert-{f}"))
            start = stages.run("student: eval", _evaluate, student, tok, client, exp.experiment(), families,
                               r.eval_size, r.eval_greedy, "student-sft")
            opd_runs: dict[float, list[dict]] = {}
            grpo_runs: dict[float, list[dict]] = {}
            for opd_lr, grpo_lr, suffix in _lr_pairs(exp):
                runs = _side_configs(exp, out, experts, opd_lr, grpo_lr, suffix)
                curves = _train_curves(exp, runs, tok, tok_path, student_dir / "sft.pt", client, start, stages,
                                       progress)
                opd_runs[opd_lr] = curves[f"student: opd{suffix}"]
                grpo_runs[grpo_lr] = curves[f"student: grpo from scratch{suffix}"]
    finally:
        if ray.is_initialized():
            ray.shutdown()
    summary = summarize(expert_outcomes, opd_runs, grpo_runs, _expert_costs(exp))
    meta = {"total_s": time.perf_counter() - started, "stage_s": stages.seconds, "concurrent_runs": r.concurrent_runs,
            "experts": {f: str(p) for f, p in experts.items()}, "kl_estimator": r.opd.kl_estimator,
            "reward_weight": r.opd.reward_weight, "coef": r.opd.coef, "config": json.loads(exp.model_dump_json())}
    write_report(out, summary, opd_runs, grpo_runs, meta)
    return summary | {"total_s": meta["total_s"]}


def _lr_pairs(exp: OPDExperiment) -> list[tuple[float, float, str]]:
    """(OPD lr, GRPO lr, run-name suffix) per OPD/GRPO pair to train: each side's own lr without a grid (no
    suffix: out_dir/opd and out_dir/grpo), else every lr of the grid for both sides."""
    if exp.recipe.lr_grid is None:
        return [(exp.opd_grpo().lr, exp.grpo.lr, "")]
    return [(lr, lr, f"-lr{lr:g}") for lr in exp.recipe.lr_grid]


def _side_configs(exp: OPDExperiment, out: Path, experts: dict[str, Path], opd_lr: float, grpo_lr: float,
                  suffix: str) -> dict[str, tuple[str, ExperimentConfig]]:
    """The OPD run's and the GRPO baseline's experiments at the given learning rates (stage -> (name, config))."""
    r = exp.recipe
    opd_algo = exp.algorithm().model_copy(update={
        "kl_coef": r.ref_kl_coef, "opd": r.opd.model_copy(update={"teachers": experts})})
    opd_cfg = exp.experiment(out_dir=str(out / f"opd{suffix}"), run_name=f"{exp.run_name}-opd{suffix}",
                             algo=opd_algo.model_dump(), grpo=exp.opd_grpo().model_dump() | {"lr": opd_lr})
    grpo_cfg = exp.experiment(**{"out_dir": str(out / f"grpo{suffix}"), "run_name": f"{exp.run_name}-grpo{suffix}",
                                 "grpo.steps": r.grpo_steps or r.steps, "grpo.lr": grpo_lr})
    return {f"student: opd{suffix}": (f"opd{suffix}", opd_cfg),
            f"student: grpo from scratch{suffix}": (f"grpo{suffix}", grpo_cfg)}


def _expert_costs(exp: OPDExperiment) -> dict[str, ExpertCost]:
    """What each expert trained here took (SFT steps x batch, GRPO steps x prompts x group); given ones: 0, their
    making is not known here."""
    r = exp.recipe
    grpo_samples = r.expert_grpo_steps * exp.grpo.prompts_per_step * exp.grpo.group_size
    return {f: ExpertCost() if f in r.experts else
            ExpertCost(sft_examples=r.expert_sft_steps * min(exp.sft.batch_size, exp.sft.examples),
                       grpo_samples=grpo_samples)
            for f in exp.tasks.families}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, nargs="?", default=DEFAULT_CONFIG)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, YAML value (e.g. recipe.steps=4)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    exp = load_config(args.config, overrides, model=OPDExperiment)
    s = run_recipe(exp, progress=not args.no_progress)
    print((Path(exp.out_dir) / "report.md").read_text())
    print(" ".join(f"{k}={v}" for k, v in headline(s).items()))


if __name__ == "__main__":
    main()
