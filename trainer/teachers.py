"""OPD teachers: one frozen expert policy per task family, each a Ray actor that scores student samples.

Why actors: a teacher is a full model; as a Ray actor it lives once per family beside the learner and the
rollout workers (on any node of the cluster) and is reloaded from its checkpoint path on every (re)start, so
resuming an OPD run needs nothing of the teachers in the run's checkpoint. Each rollout goes to the teacher of
its problem's family (its task tag); only its sampled (mask=1) positions are scored, so prompt and tool-result
tokens get no distillation term.
"""

from __future__ import annotations

from pathlib import Path

import ray
import torch

from trainer.config import ExperimentConfig, OPDConfig
from trainer.policy import build_policy
from trainer.sampler import right_pad
from trainer.tokenizer import V4Tokenizer


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A policy state_dict from an SFT file (the state_dict itself) or a learner checkpoint (its "model")."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} does not exist: train the expert first or fix "
                                f"algo.opd.teachers")
    state = torch.load(path, weights_only=False, map_location="cpu")
    return state["model"] if isinstance(state, dict) and "model" in state else state


@torch.no_grad()
def score(model: torch.nn.Module, seqs: list[list[int]], masks: list[list[int]], pad_id: int, full_vocab: bool,
          chunk: int = 8) -> list[torch.Tensor]:
    """Per sequence, the model's log-probs at its mask=1 positions: [n] of the sampled tokens, or [n, V]."""
    out: list[torch.Tensor] = []
    for start in range(0, len(seqs), chunk):
        batch = right_pad(seqs[start:start + chunk], pad_id)
        logp = torch.log_softmax(model(input_ids=batch).logits.float()[:, :-1], dim=-1)
        for row, mask in enumerate(masks[start:start + chunk]):
            picked = torch.tensor(mask[1:], dtype=torch.bool)
            n = len(mask) - 1
            if full_vocab:
                out.append(logp[row, :n][picked].clone())
            else:
                out.append(logp[row, :n].gather(-1, batch[row, 1:n + 1].unsqueeze(-1)).squeeze(-1)[picked].clone())
    return out


@ray.remote(num_cpus=0)
class TeacherActor:
    """A frozen expert of one family: the same V4 architecture as the student, weights from its checkpoint."""

    def __init__(self, cfg_json: str, tokenizer_path: str, weights_path: str) -> None:
        cfg = ExperimentConfig.model_validate_json(cfg_json)
        tok = V4Tokenizer.load(Path(tokenizer_path))
        torch.set_num_threads(cfg.torch_threads)
        self.model = build_policy(cfg.policy.name, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, cfg.seed)
        self.model.load_state_dict(load_weights(Path(weights_path)))
        self.model.eval().requires_grad_(False)
        self.pad_id = tok.pad_id

    def score(self, seqs: list[list[int]], masks: list[list[int]], full_vocab: bool) -> list[torch.Tensor]:
        return score(self.model, seqs, masks, self.pad_id, full_vocab)


def start_teachers(cfg: ExperimentConfig, tokenizer_path: Path) -> dict[str, ray.actor.ActorHandle]:
    """One TeacherActor per family of `cfg.tasks.families`; every family must have a teacher checkpoint."""
    opd = cfg.algorithm().opd
    if opd is None:
        return {}
    missing = [f for f in cfg.tasks.families if f not in opd.teachers]
    if missing:
        raise ValueError(f"OPD has no teacher for task families {missing}: set algo.opd.teachers "
                         f"{{family: checkpoint}} for each of {cfg.tasks.families}")
    for family in cfg.tasks.families:
        if not Path(opd.teachers[family]).is_file():
            raise FileNotFoundError(f"teacher checkpoint {opd.teachers[family]} for family {family!r} does not exist")
    cfg_json = cfg.model_dump_json()
    return {f: TeacherActor.remote(cfg_json, str(tokenizer_path), str(opd.teachers[f])) for f in cfg.tasks.families}


def score_rollouts(teachers: dict[str, ray.actor.ActorHandle], rollouts: list[dict], opd: OPDConfig
                   ) -> list[torch.Tensor]:
    """Route each rollout to its family's teacher (one call per family, all in parallel); results in order."""
    full = opd.kl_estimator == "full_vocab"
    by_family: dict[str, list[int]] = {}
    for i, r in enumerate(rollouts):
        if r["family"] not in teachers:
            raise ValueError(f"rollout {r['trajectory_id']} is of family {r['family']!r}, which has no teacher "
                             f"(teachers: {sorted(teachers)})")
        by_family.setdefault(r["family"], []).append(i)
    calls = {f: teachers[f].score.remote([rollouts[i]["ids"] for i in idx], [rollouts[i]["mask"] for i in idx], full)
             for f, idx in by_family.items()}
    out: list[torch.Tensor | None] = [None] * len(rollouts)
    for family, ref in calls.items():
        for i, scores in zip(by_family[family], ray.get(ref)):
            out[i] = scores
    return out  # type: ignore[return-value]
