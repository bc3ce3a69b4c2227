"""Experiment configuration: pydantic models, one YAML per experiment under trainer/configs/."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainer.core_algos import get_rollout_correction
from trainer.encoding import ThinkingMode


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PolicyConfig(_Strict):
    # the architecture: a named config from trainer.policy.NAMED_CONFIGS (V4: v4-tiny, v4-small; Qwen3:
    # qwen3-tiny), or any transformers causal LM as a local directory (with weights, e.g. a trainer.hf_export
    # export, they are loaded; config only: random init) or a model id already in the local Hugging Face cache
    name: str = "v4-tiny"
    vocab_size: int = 1024
    dtype: Literal["float32", "bfloat16"] = "float32"


class TaskConfig(_Strict):
    families: list[str] = Field(default_factory=lambda: ["arithmetic", "fix_module"])
    seed: int = 0
    heldout_size: int = 32


class SandboxConfig(_Strict):
    address: str | None = None  # dsec server; None: $DSEC_ADDRESS or an embedded local server
    image: str = "python"
    substrates: dict[str, str] = Field(default_factory=dict)  # per task family, e.g. {"arithmetic": "function"}
    default_substrate: str = "container"
    tool_timeout_s: float = 10.0
    sandbox_timeout_s: float = 900.0


class RolloutConfig(_Strict):
    thinking: ThinkingMode = "non-think"
    max_turns: int = 3
    max_new_tokens: int = 96  # per assistant turn
    max_total_tokens: int = 768
    temperature: float = 1.0
    top_p: float = 1.0
    # a rollout whose sandbox dies, expires or fails to create restarts in a fresh sandbox rebuilt from its
    # trajectory log (its logged calls replay), at most this many times; then it fails alone (stop_reason
    # sandbox_lost or timeout, reward 0) and algo.on_group_failure decides what its group becomes
    max_retries: int = Field(default=2, ge=0)
    # sandbox work of one batch (the creates and file writes, each turn's tool calls, the verifiers) run by this
    # many threads at once: those calls wait on the dsec server, so they overlap; each rollout's own calls stay in
    # order. 1 runs them one rollout after another on the calling thread. The samples are the same either way.
    sandbox_concurrency: int = Field(default=8, ge=1)
    # the batch is sampled in this many waves (fixed slices of it, each sampled turn by turn), so one wave's tool
    # calls run while the next wave is sampled instead of the loop waiting for them at each turn's end; a wave has
    # at least `min_wave_rows` rollouts (fewer rows make fewer waves: a GRPO step of the demo config, 32 rows, is one
    # wave). 1: the whole batch at once. Given the same tool results the sampled ids are the same either way (per-row
    # random streams); the recorded log-probs agree to float rounding (a smaller batch rounds its matmuls
    # otherwise), and a given config always cuts a batch alike
    waves: int = Field(default=2, ge=1)
    min_wave_rows: int = Field(default=32, ge=1)


class OPDConfig(_Strict):
    """On-policy distillation: per-family teachers score the student's own samples (token-level reverse KL).

    The advantage of a sampled token becomes reward_weight·A_reward − coef·(log π_student − log π_teacher);
    `full_vocab` replaces the sampled difference by the exact reverse KL over the vocabulary at that position
    (an analytic loss term: the same expected gradient, without the sampling noise).
    """

    teachers: dict[str, Path] = Field(default_factory=dict)  # task family -> expert weights (state_dict or learner.pt)
    kl_estimator: Literal["full_vocab", "sampled_token"] = "full_vocab"
    reward_weight: float = 0.0  # 0: pure distillation; > 0 mixes in the group-normalised GRPO reward advantage
    coef: float = 1.0  # λ on the reverse-KL term


class AlgoConfig(_Strict):
    advantage: str = "grpo"
    policy_loss: str = "clipped"
    loss_agg: str = "seq_mean_token_mean"
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.02
    kl_estimator: str = "k3"
    drop_zero_variance: bool = False
    const_len: int = 256  # Dr. GRPO's constant normaliser
    opd: OPDConfig | None = None  # set: on-policy distillation (teachers' token adjustment on the same loss)
    # trainer.tito: a sample whose trainable ids are not the ids sampled (or whose prompt is trainable) fails the
    # step ("refuse"), or is left out of the loss ("drop"); either way `tito_violations` counts it
    tito_check: Literal["refuse", "drop"] = "refuse"
    # trainer.core_algos ROLLOUT_CORRECTIONS: none | tis_token | tis_seq | mask_token | mask_seq, comparing the
    # learner's π_old with the sampler's recorded log-probs; ratios above `rollout_is_threshold` are truncated
    # (tis_*) or, outside [rollout_is_threshold_lower (default 1/threshold), threshold], masked (mask_*)
    rollout_correction: str = "none"
    rollout_is_threshold: float = Field(default=2.0, gt=1.0)
    rollout_is_threshold_lower: float | None = Field(default=None, gt=0.0)
    # a group with a failed rollout (sandbox lost after every retry): "drop" leaves the whole group out of the
    # loss; "fill" replaces each failed sample by a copy of a surviving one (a group with none is dropped)
    on_group_failure: Literal["drop", "fill"] = "drop"
    overlong_filter: bool = False  # leave samples cut by the token or turn budget (stop_reason length) out of the loss

    @field_validator("rollout_correction")
    @classmethod
    def _known_correction(cls, name: str) -> str:
        get_rollout_correction(name)  # an unknown name fails at load time, listing the registered ones
        return name

    @classmethod
    def preset(cls, name: str) -> AlgoConfig:
        """The named variants of the issue; any field can still be overridden in YAML."""
        presets = {
            "grpo": {},
            "dr_grpo": {"advantage": "dr_grpo", "loss_agg": "seq_mean_token_sum_norm"},
            "dapo": {"loss_agg": "token_mean", "clip_high": 0.28, "drop_zero_variance": True, "kl_coef": 0.0},
            "opd": {"kl_coef": 0.0, "opd": {}},  # teachers are filled in per experiment
        }
        if name not in presets:
            raise ValueError(f"unknown algorithm preset {name!r}; choose one of {sorted(presets)}")
        return cls(**presets[name])


class SFTConfig(_Strict):
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    examples: int = 2000
    # Share of demonstrations, in families that have one, that answer straight away without a tool call. The
    # answers are correct, but a tiny model cannot compute them in its head: the warm-started policy then calls
    # the tool on only part of the problems, and RL has to discover that the tool is what gets rewarded.
    direct_answer_fraction: float = Field(default=0.0, ge=0.0, le=1.0)


class GRPOConfig(_Strict):
    steps: int = Field(default=10, ge=0)
    prompts_per_step: int = Field(default=4, ge=1)
    group_size: int = Field(default=4, ge=1)  # >= 2 wherever the group-normalised reward is used (checked below)
    lr: float = Field(default=5e-4, gt=0)
    updates_per_step: int = Field(default=1, ge=1)
    num_rollout_workers: int = Field(default=1, ge=1)
    grad_clip: float = 1.0
    # parameter-name substrings held fixed during RL (e.g. ["embed_tokens", "self_attn"]); measured on v4-tiny:
    # a policy-gradient step of norm 0.1 along the attention weights breaks the SFT-learned copy circuit (log-prob
    # of rewarded samples -14 nats) while the same step along the MLP experts, norms, mHC and head improves it
    freeze: list[str] = Field(default_factory=list)
    # trainer.async_grpo: rollout workers generate up to this many policy versions ahead of the learner (a batch
    # trained at version v was started by version >= v - max_staleness); 0 is the synchronous loop
    max_staleness: int = Field(default=0, ge=0)
    # with max_staleness > 0: a rollout in flight picks up newer weights at its next turn (its turns record their
    # versions); False keeps each rollout on the weights it started with
    partial_rollouts: bool = True


class ExperimentConfig(_Strict):
    run_name: str = "tiny-cpu"
    out_dir: Path = Path("runs/tiny-cpu")
    seed: int = 0
    torch_threads: int = 2
    algo_preset: str = "grpo"
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    tasks: TaskConfig = Field(default_factory=TaskConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algo: AlgoConfig | None = None  # None: AlgoConfig.preset(algo_preset)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)

    def algorithm(self) -> AlgoConfig:
        return self.algo or AlgoConfig.preset(self.algo_preset)

    @model_validator(mode="after")
    def _reward_needs_a_group(self) -> ExperimentConfig:
        """A group of one has no baseline: its reward advantage is 0, so a reward-only run would learn nothing
        while looking healthy. Only pure distillation (OPD with reward_weight 0) may sample once per prompt."""
        algo = self.algorithm()  # also reports an unknown algo_preset at load time
        uses_reward = algo.opd is None or algo.opd.reward_weight > 0
        if uses_reward and self.grpo.group_size < 2:
            raise ValueError(f"grpo.group_size={self.grpo.group_size}: the group-normalised reward advantage needs "
                             "at least 2 samples per prompt (group_size 1 only works for pure OPD, "
                             "algo.opd.reward_weight 0)")
        return self


def load_config(path: Path, overrides: dict[str, object] | None = None, model: type[ExperimentConfig] = ExperimentConfig
                ) -> ExperimentConfig:
    """Read one experiment YAML; `overrides` use dotted keys (e.g. {"grpo.steps": 2}).

    A top-level `base: other.yaml` (relative to this file) is read first and deep-merged under this file, so a
    recipe's YAML inherits the tuned experiment it builds on. `model`: a subclass adding recipe sections.
    """
    data = _read_yaml(Path(path))
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return model.model_validate(data)


def _read_yaml(path: Path) -> dict:
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("base", None)
    return _merge(_read_yaml(path.parent / base), data) if base else data


def _merge(under: dict, over: dict) -> dict:
    out = dict(under)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
