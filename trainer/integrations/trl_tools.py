"""dsec inside TRL: a `GRPOTrainer` reward function whose tool calls and verifier run in dsec sandboxes.

    reward = DsecToolReward(tok, client=dsec.Client(), run_id="my-run")
    trainer = GRPOTrainer(model=..., reward_funcs=reward, callbacks=[reward.callback()], train_dataset=data, ...)
    # data rows: {"prompt": <V4 prompt text>, "problem": Problem.model_dump_json()}  (see `dataset_rows`)

Why a reward function: TRL's single-turn GRPO has one place where the world is touched, the reward. Each
completion is parsed as a V4 assistant turn; its DSML tool calls run in the completion's own dsec sandbox, inside
the dsec trajectory `run/step-S/sample-I/<digest of problem and completion ids>`, and the task's verifier runs there
too. The reward is the verifier's score of the turn's final text, or, when the turn only called tools, of the last
tool output (single turn: the tool's answer is the completion's answer).

Why the trajectory: a TRL run resumed from a checkpoint re-generates the interrupted step (TRL restores its RNG, so
the same completions come back), calls the reward again with the same trajectory ids, and the dsec server answers
every tool call from its log: nothing runs twice. Sandboxes are therefore kept until a checkpoint covers their
step (`callback()` destroys them on save, and all of them at the end of training). A completion that differs on
resume has a different digest: a new trajectory, run live, as it is a different call.
"""

from __future__ import annotations

import hashlib
from typing import Any

import dsec
from transformers import TrainerCallback

from trainer.config import SandboxConfig
from trainer.encoding import DSMLParseError, Message, ThinkingMode, parse_assistant, render_conversation
from trainer.tasks import Problem, get_task
from trainer.tokenizer import V4Tokenizer
from trainer.tools import ToolBox, ToolStats, open_toolbox


def dataset_rows(problems: list[Problem], mode: ThinkingMode = "non-think") -> list[dict[str, str]]:
    """TRL dataset rows: the V4 prompt text (system with the family's tools, user, generation prompt) and the
    problem (the reward's verifier needs it)."""
    rows = []
    for p in problems:
        task = get_task(p.family)
        msgs = [Message(role="system", content=task.system), Message(role="user", content=p.prompt)]
        rows.append({"prompt": render_conversation(msgs, task.tools, mode), "problem": p.model_dump_json()})
    return rows


class DsecToolReward:
    """A TRL reward function (sync callable). `stats` sums live and replayed tool calls over all completions."""

    __name__ = "dsec_tools"  # TRL names the reward's metrics after it

    def __init__(self, tok: V4Tokenizer, *, client: dsec.Client, run_id: str, sandbox: SandboxConfig | None = None,
                 mode: ThinkingMode = "non-think") -> None:
        self.tok, self.client, self.run_id, self.mode = tok, client, run_id, mode
        self.sandbox = sandbox or SandboxConfig()
        self.stats = ToolStats()
        self._boxes: dict[int, list[ToolBox]] = {}  # by the trainer step that scored them
        self.sandbox_ids: list[str] = []  # every sandbox a completion ran in, for audits and tests

    def trajectory_id(self, step: int, index: int, problem: Problem, completion_ids: list[int]) -> str:
        digest = hashlib.sha256(f"{problem.id}/{','.join(map(str, completion_ids))}".encode()).hexdigest()[:16]
        return f"{self.run_id}/step-{step}/sample-{index}/{digest}"

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                 problem: list[str], trainer_state: Any = None, **_: Any) -> list[float]:
        step = trainer_state.global_step if trainer_state is not None else 0
        return [self._score(step, i, Problem.model_validate_json(p), list(ids))
                for i, (p, ids) in enumerate(zip(problem, completion_ids))]

    def _score(self, step: int, index: int, problem: Problem, ids: list[int]) -> float:
        s = self.sandbox
        box = open_toolbox(self.client, self.trajectory_id(step, index, problem, ids), image=s.image,
                           substrate=s.substrates.get(problem.family, s.default_substrate), timeout_s=s.tool_timeout_s,
                           sandbox_timeout_s=s.sandbox_timeout_s)
        self._boxes.setdefault(step, []).append(box)
        self.sandbox_ids.append(box.sandbox.id)
        for path, content in problem.files.items():
            box.write_file(path, content)
        # TRL's `completions` drop special tokens, and with them the DSML marker: read the ids
        text = self.tok.decode(ids)
        try:
            turn = parse_assistant(text, self.mode)
        except DSMLParseError:
            final = ""
        else:
            outputs = [box.execute(call) for call in turn.tool_calls] if turn.finished else []
            final = turn.content or (outputs[-1].strip() if outputs else "")
        score = get_task(problem.family).verify(problem, final, box)
        self.stats.live += box.stats.live
        self.stats.replayed += box.stats.replayed
        return score

    def release(self, before_step: int | None = None) -> None:
        """Destroy the sandboxes of steps < `before_step` (all when None): a checkpoint covers them."""
        for step in [k for k in self._boxes if before_step is None or k < before_step]:
            for box in self._boxes.pop(step):
                box.close()

    def callback(self) -> TrainerCallback:
        reward = self

        class ReleaseOnSave(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback's signature
                reward.release(before_step=state.global_step)

            def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
                reward.release()

        return ReleaseOnSave()
