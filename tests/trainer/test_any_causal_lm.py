"""Any transformers causal LM as the policy: a tiny random Qwen3 goes through SFT, the sampler and a GRPO update
like the default DeepSeek-V4, and both architectures export to the Hugging Face format and load back with the
same logits (through `AutoModelForCausalLM` and through the project's loader)."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

from trainer import checkpoint, hf_export, tito
from trainer.config import AlgoConfig, ExperimentConfig, SFTConfig
from trainer.data import corpus, demo_pieces, problems, tokenize_pieces
from trainer.learner import Learner
from trainer.policy import build_policy
from trainer.rollout import Rollout
from trainer.sampler import sample, sample_generator, token_logprobs
from trainer.sft import train_sft
from trainer.tokenizer import train

FAMILIES = ["arithmetic", "fix_module"]
TOK = train(corpus(FAMILIES, 0, 60, "non-think"), 512)


def _policy(name: str) -> torch.nn.Module:
    torch.set_num_threads(2)
    return build_policy(name, TOK.vocab_size, TOK.bos_id, TOK.eos_id, TOK.pad_id, seed=0).eval()


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["v4-tiny", "qwen3-tiny"])
def test_export_loads_back_with_identical_logits(name, tmp_path):
    model = _policy(name)
    out = hf_export.export(model, TOK, tmp_path / "export")
    ids = torch.randint(10, TOK.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    want = _logits(model, ids)

    auto = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(auto) is type(model)
    assert torch.equal(_logits(auto, ids), want)

    ours, hf_tok = hf_export.load(out)
    assert torch.equal(_logits(ours, ids), want)
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).pad_token_id == TOK.pad_id
    text = problems(FAMILIES, "train", 1, 0)[0].prompt
    assert hf_tok.encode(text, add_special_tokens=False) == TOK.encode(text)


def test_qwen3_policy_sft_step_sampling_and_grpo_update(tmp_path):
    model = _policy("qwen3-tiny")
    assert isinstance(model, Qwen3ForCausalLM)
    train_problems = problems(FAMILIES, "train", 4, 0)
    examples = [tokenize_pieces(TOK, demo_pieces(p, "non-think")) for p in train_problems]

    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_sft(model, examples, SFTConfig(steps=1, batch_size=4, lr=3e-3), TOK.pad_id, 0)
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses)).all()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

    # Sampling: per-sample RNG makes a sample independent of its batch, and the recorded log-probs are the
    # learner's (token-in/token-out on this architecture too).
    prompts = [ids[: len(ids) - sum(mask)] for ids, mask in examples]
    gens = [sample_generator("any-lm", i) for i in range(len(prompts))]
    recorded: list[list[float]] = [[] for _ in prompts]
    new = sample(model, prompts, gens, max_new_tokens=[12] * len(prompts), eos_id=TOK.eos_id, pad_id=TOK.pad_id,
                 logprobs=recorded)
    alone = sample(model, prompts[:1], [sample_generator("any-lm", 0)], max_new_tokens=[12], eos_id=TOK.eos_id,
                   pad_id=TOK.pad_id)
    assert alone[0] == new[0] and all(len(n) > 0 for n in new)
    rollouts = []
    for i, (prompt, sampled) in enumerate(zip(prompts, new, strict=True)):
        ids = prompt + sampled
        learner_logp = token_logprobs(model, [ids], TOK.pad_id)[0, len(prompt) - 1:]
        assert torch.allclose(learner_logp, torch.tensor(recorded[i]), atol=1e-4)
        rollouts.append(Rollout(f"t/step-0/prompt-{i // 2}/sample-{i % 2}", train_problems[i].id,
                                train_problems[i].family, ids, [0] * len(prompt) + [1] * len(sampled),
                                reward=float(i % 2), sampled_hash=tito.extend(None, sampled),
                                logprobs=[0.0] * len(prompt) + recorded[i], stop_reason="length"))

    algo = AlgoConfig.preset("grpo").model_copy(update={"rollout_correction": "tis_token"})
    learner = Learner(model, algo, 1e-3, 1.0, TOK.pad_id)
    before = learner.weights()
    metrics = learner.update(rollouts, group_size=2)
    assert metrics["kept_samples"] == 4 and metrics["tito_violations"] == 0
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert any(not torch.equal(before[k], v) for k, v in learner.weights().items())

    # The run's checkpoint exports to the Hugging Face format: the exported policy is the learner's.
    ckpt = tmp_path / "learner.pt"
    checkpoint.save(ckpt, checkpoint.Manifest(run_id="any-lm", step=1, cursor=0, contents=list(checkpoint.CONTENTS)),
                    {**learner.payload(), "sandboxes": []})
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"policy": {"name": "qwen3-tiny"}}))
    TOK.save(tmp_path / "tokenizer.json")
    out = hf_export.export_checkpoint(config, tmp_path / "tokenizer.json", ckpt, tmp_path / "hf")
    ids = torch.tensor([rollouts[0].ids])
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids), _logits(model.eval(), ids))


def test_policy_name_picks_the_architecture_and_unknown_names_are_clear_errors(tmp_path):
    assert ExperimentConfig.model_validate({"policy": {"name": "qwen3-tiny"}}).policy.name == "qwen3-tiny"
    assert type(_policy("v4-tiny")).__name__ == "DeepseekV4ForCausalLM"  # the default stays V4
    assert ExperimentConfig().policy.name == "v4-tiny"
    with pytest.raises(ValueError, match="neither a named config"):
        build_policy(str(tmp_path / "missing"), TOK.vocab_size, TOK.bos_id, TOK.eos_id, TOK.pad_id, 0)
    exported = hf_export.export(_policy("qwen3-tiny"), TOK, tmp_path / "export")
    with pytest.raises(ValueError, match="vocabulary of"):
        build_policy(str(exported), TOK.vocab_size + 1, TOK.bos_id, TOK.eos_id, TOK.pad_id, 0)
    with pytest.raises(FileNotFoundError, match="no model weights"):
        hf_export.load(tmp_path)
