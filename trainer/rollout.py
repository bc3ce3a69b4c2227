"""The multi-turn agent loop: generate → parse DSML → run calls in the rollout's sandbox → append results.

Tokens in, tokens out: a rollout's `ids` are the prompt pieces' ids, the exact sampled ids, and the ids of the
tool-result pieces, concatenated, never re-tokenised. `mask` is 1 on sampled ids only, so tool results and
prompts get no policy gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dsec
import torch
from transformers import PreTrainedModel

from trainer.config import RolloutConfig, SandboxConfig
from trainer.encoding import (
    USER,
    DSMLParseError,
    Message,
    assistant_opener,
    parse_assistant,
    render_segments,
    render_tool_results,
)
from trainer import tito
from trainer.sampler import sample, sample_generator
from trainer.tasks import Problem, get_task
from trainer.tokenizer import V4Tokenizer
from trainer.tools import ToolBox, open_toolbox


@dataclass
class Rollout:
    trajectory_id: str
    problem_id: str
    family: str
    ids: list[int]
    mask: list[int]
    reward: float = 0.0
    turns: int = 0
    final: str = ""
    tool_calls: int = 0
    tools_live: int = 0
    tools_replayed: int = 0
    parse_errors: int = 0
    sandbox_id: str = ""
    sampled_hash: int | None = None  # trainer.tito rolling hash of every sampled id, in order (None: none yet)


@dataclass
class _Live:
    rollout: Rollout
    problem: Problem
    box: ToolBox
    gen: torch.Generator
    done: bool = False
    history: list[str] = field(default_factory=list)


def prompt_ids(tok: V4Tokenizer, problem: Problem, mode: str) -> list[int]:
    task = get_task(problem.family)
    msgs = [Message(role="system", content=task.system), Message(role="user", content=problem.prompt)]
    return [i for text, _ in render_segments(msgs, task.tools, mode) for i in tok.encode(text)]  # type: ignore[arg-type]


def tool_result_ids(tok: V4Tokenizer, results: list[str], mode: str) -> list[int]:
    return tok.encode(USER + render_tool_results(results) + assistant_opener(mode))  # type: ignore[arg-type]


def run_rollouts(
    model: PreTrainedModel,
    tok: V4Tokenizer,
    client: dsec.Client,
    jobs: list[tuple[str, Problem]],
    rollout_cfg: RolloutConfig,
    sandbox_cfg: SandboxConfig,
    seed: int,
    keep_sandboxes: bool = False,
) -> list[Rollout]:
    """Run one rollout per (trajectory id, problem), all batched together; each gets its own sandbox.

    The sampling RNG of a rollout is keyed by (seed, trajectory id minus its leading run component) only, so
    re-running an interrupted step samples the same tokens, re-issues the same tool calls, and the trajectory log
    answers them; and two runs with the same seed sample alike. `keep_sandboxes`: the GRPO driver destroys them
    only after the step's checkpoint, so a step interrupted even after its rollouts finished still replays.
    """
    mode = rollout_cfg.thinking
    live: list[_Live] = []
    try:
        for tid, problem in jobs:
            substrate = sandbox_cfg.substrates.get(problem.family, sandbox_cfg.default_substrate)
            box = open_toolbox(client, tid, image=sandbox_cfg.image, substrate=substrate,
                               timeout_s=sandbox_cfg.tool_timeout_s, sandbox_timeout_s=sandbox_cfg.sandbox_timeout_s)
            live.append(_Live(Rollout(tid, problem.id, problem.family, [], []), problem, box,
                              sample_generator(seed, tid.split("/", 1)[-1])))
            for path, content in problem.files.items():
                box.write_file(path, content)
            ids = prompt_ids(tok, problem, mode)
            live[-1].rollout.ids, live[-1].rollout.mask = ids, [0] * len(ids)
        for _turn in range(rollout_cfg.max_turns):
            active = [x for x in live if not x.done and len(x.rollout.ids) < rollout_cfg.max_total_tokens]
            if not active:
                break
            budgets = [min(rollout_cfg.max_new_tokens, rollout_cfg.max_total_tokens - len(x.rollout.ids)) for x in active]
            outs = sample(model, [x.rollout.ids for x in active], [x.gen for x in active], max_new_tokens=budgets,
                          eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=rollout_cfg.temperature,
                          top_p=rollout_cfg.top_p)
            for x, new in zip(active, outs):
                _advance(x, new, tok, mode)
        for x in live:
            task = get_task(x.problem.family)
            x.rollout.reward = task.verify(x.problem, x.rollout.final, x.box)
            x.rollout.tools_live, x.rollout.tools_replayed = x.box.stats.live, x.box.stats.replayed
            x.rollout.sandbox_id = x.box.sandbox.id
    except Exception:
        _close(live)
        raise
    # Not on SystemExit/KeyboardInterrupt (a Ray worker whose trainer died): those sandboxes stay live until
    # their timeout so the resumed step re-attaches to them and replays its logged calls.
    if not keep_sandboxes:
        _close(live)
    return [x.rollout for x in live]


def _close(live: list[_Live]) -> None:
    for x in live:
        x.box.close()


def _advance(x: _Live, new: list[int], tok: V4Tokenizer, mode: str) -> None:
    """Append one sampled assistant turn; run its calls (or report the parse error) or finish the rollout."""
    r = x.rollout
    r.ids += new
    r.mask += [1] * len(new)
    r.sampled_hash = tito.extend(r.sampled_hash, new)
    r.turns += 1
    text = tok.decode(new)
    try:
        turn = parse_assistant(text, mode)  # type: ignore[arg-type]
    except DSMLParseError as exc:
        if not text.endswith(tok.decode([tok.eos_id])):
            x.done = True  # cut by the budget mid-block: nothing to run, nothing to answer
            return
        r.parse_errors += 1
        results = [f"error: malformed tool call: {exc}"]
    else:
        if not turn.tool_calls or not turn.finished:
            r.final, x.done = turn.content, True
            return
        r.tool_calls += len(turn.tool_calls)
        results = [x.box.execute(call) for call in turn.tool_calls]
    extra = tool_result_ids(tok, results, mode)
    r.ids += extra
    r.mask += [0] * len(extra)
