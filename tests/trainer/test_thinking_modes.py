"""Thinking modes are configuration: `rollout.thinking` in the experiment YAML decides what the rollout engine
feeds the policy and how it parses the reply, exactly as shared/DSML.md describes each mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.data import corpus, demo_pieces, problems, tokenize_pieces
from trainer.encoding import ASSISTANT, BOS, END_THINK, EOS, THINK, THINK_MAX_PREFIX, USER, parse_assistant
from trainer.rollout import prompt_ids, tool_result_ids
from trainer.tasks import get_task
from trainer.tokenizer import train

CONFIG = Path(__file__).resolve().parents[2] / "trainer" / "configs" / "tiny-cpu.yaml"
MODES = ["non-think", "high", "max"]


@pytest.fixture(scope="module")
def tok():
    return train(corpus(["arithmetic", "fix_module"], 0, 40, "high"), 1024)


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_renders_as_dsml_md_from_the_config(tok, mode):
    cfg = load_config(CONFIG, {"rollout.thinking": mode})
    assert cfg.rollout.thinking == mode
    problem = problems(["arithmetic"], "heldout", 1, 0)[0]
    task = get_task(problem.family)
    prompt = tok.decode(prompt_ids(tok, problem, cfg.rollout.thinking))

    # Think Max: a fixed prefix to the system prompt; the other modes leave the system prompt as written.
    system_start = BOS + (THINK_MAX_PREFIX if mode == "max" else "") + task.system
    assert prompt.startswith(system_start)
    assert (THINK_MAX_PREFIX in prompt) == (mode == "max")
    # Generation prompt: non-think closes the think block at once (output starts after `</think>`);
    # high and max open it.
    opener = ASSISTANT + (END_THINK if mode == "non-think" else THINK)
    assert prompt.endswith(USER + problem.prompt + opener)
    # Tool results ride in the next user turn (no tool role), followed by the same mode's opener.
    results = tok.decode(tool_result_ids(tok, ["42\n"], cfg.rollout.thinking))
    assert results == USER + "<tool_result>42\n</tool_result>" + opener


@pytest.mark.parametrize("mode", MODES)
def test_sft_demonstrations_and_parser_follow_the_mode(tok, mode):
    problem = problems(["arithmetic"], "train", 1, 0)[0]
    pieces = demo_pieces(problem, mode)
    outputs = [text for text, trainable in pieces if trainable]
    assert outputs and all(text.endswith(EOS) for text in outputs)
    for text in outputs:
        # In non-think mode the opener already wrote `</think>`, so the sampled body starts with the content;
        # in thinking modes the policy writes (empty) reasoning then `</think>` itself.
        assert (END_THINK in text) == (mode != "non-think")
        turn = parse_assistant(text, mode)
        assert turn.finished
    assert parse_assistant(outputs[-1], mode).content == problem.answer
    ids, mask = tokenize_pieces(tok, pieces)
    assert len(ids) == len(mask) and tok.decode(ids) == "".join(text for text, _ in pieces)
