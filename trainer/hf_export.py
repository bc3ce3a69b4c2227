"""Export a policy (or a run's checkpoint) to the Hugging Face format, and load such an export back.

Why: a trainer checkpoint (trainer.checkpoint) is one torch file holding the optimizer, the reference model and
the run's cursor; nothing outside dsec reads it. The export is what other tools take: `save_pretrained` of the
model (config.json + safetensors) beside the project's tokenizer as a `PreTrainedTokenizerFast`, so
`AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` (vLLM, TRL, `generate`) read
it, and `trainer.policy.build_policy(dir, ...)` starts a new run from it.

    python -m trainer.hf_export CONFIG.yaml --tokenizer runs/x/tokenizer.json --checkpoint runs/x/learner.pt OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from trainer import checkpoint
from trainer.config import load_config
from trainer.policy import build_policy, has_weights
from trainer.tokenizer import V4Tokenizer


def export(model: PreTrainedModel, tok: V4Tokenizer, out_dir: Path) -> Path:
    """Write `model` and `tok` to `out_dir` in the Hugging Face layout; returns `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.as_hf().save_pretrained(out_dir)
    return out_dir


def export_checkpoint(config: Path, tokenizer: Path, ckpt: Path, out_dir: Path) -> Path:
    """The policy weights of a trainer checkpoint (or a bare state_dict such as sft.pt), exported."""
    cfg = load_config(config)
    tok = V4Tokenizer.load(tokenizer)
    model = build_policy(cfg.policy.name, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, cfg.seed)
    model.load_state_dict(_policy_state(Path(ckpt)))
    return export(model.eval(), tok, out_dir)


def load(out_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """An export's model (float32, eval mode) and tokenizer, through the project's loader."""
    out_dir = Path(out_dir)
    if not has_weights(out_dir):
        raise FileNotFoundError(f"{out_dir} holds no model weights: write it with trainer.hf_export first")
    hf_tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    model = build_policy(str(out_dir), len(hf_tok), hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id,
                         seed=0)
    return model.eval(), hf_tok


def _policy_state(path: Path) -> dict[str, torch.Tensor]:
    """A trainer checkpoint's "model" entry; a file that is not a checkpoint is read as a bare state_dict."""
    try:
        return checkpoint.load(path)[1]["model"]
    except checkpoint.CheckpointError:
        state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, dict):
        raise checkpoint.CheckpointError(f"{path} is neither a trainer checkpoint nor a state_dict")
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description="Export a trainer checkpoint to the Hugging Face format")
    parser.add_argument("config", type=Path, help="the run's experiment YAML (names the policy architecture)")
    parser.add_argument("out", type=Path, help="directory to write (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True, help="learner.pt of a run, or a state_dict")
    args = parser.parse_args()
    print(export_checkpoint(args.config, args.tokenizer, args.checkpoint, args.out))


if __name__ == "__main__":
    main()
