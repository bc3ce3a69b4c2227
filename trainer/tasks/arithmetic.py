"""Arithmetic on numbers too large to guess: the policy must call `run_python` and copy the result."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from trainer.encoding import Message, ToolCall, ToolSchema
from trainer.tasks.base import ContentSplitTask, Problem

if TYPE_CHECKING:
    from trainer.tools import ToolBox

RUN_PYTHON = ToolSchema(
    name="run_python",
    description="Run Python code in a sandbox and return what it printed.",
    parameters={"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
)

_OPS = ("+", "-", "*")


class Arithmetic(ContentSplitTask):
    name = "arithmetic"
    system = "You are a careful assistant. Use tools for exact arithmetic."
    tools = [RUN_PYTHON]

    def __init__(self, min_digits: int = 3, max_digits: int = 4) -> None:
        self.min_digits = min_digits
        self.max_digits = max_digits

    def generator_params(self) -> tuple:
        return (self.min_digits, self.max_digits)

    def candidate(self, rng: random.Random) -> Problem:
        a, b = (rng.randrange(10 ** (rng.randint(self.min_digits, self.max_digits) - 1), 10 ** self.max_digits)
                for _ in range(2))
        op = rng.choice(_OPS)
        expr = f"{a} {op} {b}"
        return Problem(
            id="",
            family=self.name,
            prompt=f"What is {expr}? Reply with the number only.",
            answer=str(eval(expr)),  # noqa: S307 - expr is built from two ints and one operator above
            data={"expr": expr},
        )

    def demonstration(self, problem: Problem) -> list[Message]:
        call = ToolCall(name="run_python", arguments={"code": f"print({problem.data['expr']})"})
        return [
            Message(role="assistant", tool_calls=[call]),
            Message(role="user", tool_results=[problem.answer + "\n"]),
            Message(role="assistant", content=problem.answer),
        ]

    def direct_demonstration(self, problem: Problem) -> list[Message]:
        """The right number with no tool call: correct, yet for 3-4 digit operands a guess for a small model."""
        return [Message(role="assistant", content=problem.answer)]

    def verify(self, problem: Problem, final: str, box: ToolBox) -> float:
        """The comparison runs in the sandbox so the verifier and the tools share one execution path."""
        return 1.0 if box.check_equal(final.strip(), problem.data["expr"]) else 0.0
