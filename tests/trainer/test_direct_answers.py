"""SFT data that mixes tool-using and direct-answer demonstrations (`sft.direct_answer_fraction`)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trainer.config import SFTConfig
from trainer.data import corpus, demo_pieces, problems, sft_examples
from trainer.tokenizer import train

FAMILIES = ["arithmetic", "fix_module"]
TOK = train(corpus(FAMILIES, 0, 60, "non-think"), 512)
CALL = "<｜DSML｜tool_calls>"


def _uses_tools(ids: list[int], mask: list[int]) -> bool:
    """Whether the assistant's own tokens (mask 1; the system prompt also describes the format) call a tool."""
    return CALL in TOK.decode([i for i, m in zip(ids, mask) if m])


def test_direct_arithmetic_demo_is_the_correct_answer_without_a_call():
    problem = problems(["arithmetic"], "train", 1, 0)[0]
    pieces = demo_pieces(problem, "non-think", direct=True)
    outputs = [text for text, trainable in pieces if trainable]
    assert len(outputs) == 1 and CALL not in outputs[0] and problem.answer in outputs[0]


def test_families_without_a_direct_answer_keep_their_tool_demo():
    problem = problems(["fix_module"], "train", 1, 0)[0]
    assert demo_pieces(problem, "non-think", direct=True) == demo_pieces(problem, "non-think")


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_fraction_of_direct_demos_is_seeded_and_only_in_arithmetic(fraction):
    examples = sft_examples(TOK, FAMILIES, 200, 0, "non-think", fraction)
    assert examples == sft_examples(TOK, FAMILIES, 200, 0, "non-think", fraction)  # same set when rebuilt
    arithmetic, fix_module = examples[0::2], examples[1::2]
    assert all(_uses_tools(ids, mask) for ids, mask in fix_module)
    direct = sum(not _uses_tools(ids, mask) for ids, mask in arithmetic) / len(arithmetic)
    assert abs(direct - fraction) <= 0.12, direct


def test_fraction_outside_unit_interval_is_rejected():
    with pytest.raises(ValidationError):
        SFTConfig(direct_answer_fraction=1.5)


def test_rl_prompts_never_repeat_an_sft_problem():
    """A policy that memorised demonstrated answers must not be rewarded for recalling them during RL."""
    from trainer.config import ExperimentConfig
    from trainer.grpo import fresh_state, step_jobs

    cfg = ExperimentConfig.model_validate({"sft": {"examples": 300}, "grpo": {"prompts_per_step": 4}})
    state = fresh_state(cfg)
    seen = {p.id for p in problems(cfg.tasks.families, "train", cfg.sft.examples, cfg.tasks.seed)}
    rl = {job["id"] for step in range(25) for _, job in step_jobs(cfg, "r", step, state["cursor"] + 4 * step)}
    assert len(rl) == 100 and not rl & seen
