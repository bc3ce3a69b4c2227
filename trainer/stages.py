"""The pipeline stages every recipe starts from: train the tokenizer, then SFT the policy.

Shared by the demo (`trainer/demo.py`), the OPD recipe (`trainer/opd.py`) and the benches, so none of them
imports another's script. Each stage writes its artifact under `out` (tokenizer.json, sft.pt).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from trainer.config import ExperimentConfig
from trainer.data import corpus, sft_examples
from trainer.policy import build_policy
from trainer.sft import train_sft
from trainer.tokenizer import V4Tokenizer, train


def stage_tokenizer(cfg: ExperimentConfig, out: Path) -> V4Tokenizer:
    tok = train(corpus(cfg.tasks.families, cfg.tasks.seed, 400, cfg.rollout.thinking), cfg.policy.vocab_size)
    tok.save(out / "tokenizer.json")
    return tok


def stage_sft(cfg: ExperimentConfig, tok: V4Tokenizer, out: Path, progress: bool = True, init: Path | None = None):
    """SFT from random init, or from `init` (a state_dict file: e.g. an expert fine-tuned from the student)."""
    torch.set_num_threads(cfg.torch_threads)
    examples = sft_examples(tok, cfg.tasks.families, cfg.sft.examples, cfg.tasks.seed, cfg.rollout.thinking,
                            cfg.sft.direct_answer_fraction)
    model = build_policy(cfg.policy.name, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, cfg.seed)
    if init is not None:
        model.load_state_dict(torch.load(init, weights_only=True))
    bar = tqdm(total=cfg.sft.steps, desc="sft", disable=not progress)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    losses = train_sft(model, examples, cfg.sft, tok.pad_id, cfg.seed, on_step)
    bar.close()
    torch.save(model.state_dict(), out / "sft.pt")
    return model, losses
