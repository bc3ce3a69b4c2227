"""A file task: one function in a small module uses the wrong operator; make its unit tests pass."""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING

from trainer.encoding import Message, ToolCall, ToolSchema
from trainer.tasks.base import ContentSplitTask, Problem

if TYPE_CHECKING:
    from trainer.tools import ToolBox

WRITE_FILE = ToolSchema(
    name="write_file",
    description="Write a file in the sandbox (replacing it).",
    parameters={
        "type": "object",
        "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
        "required": ["path", "content"],
    },
)
RUN_SHELL = ToolSchema(
    name="run_shell",
    description="Run a shell command in /work of the sandbox; returns exit code and output.",
    parameters={"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
)

# what the docstring promises -> the correct expression
_OPS = {
    "sum": "a + b",
    "difference": "a - b",
    "product": "a * b",
    "maximum": "max(a, b)",
    "minimum": "min(a, b)",
    "absolute difference": "abs(a - b)",
    "remainder": "a % b",
}
# function names: 16 verbs x 12 endings = 192, so with 7 x 6 (promised, written) operator pairs there are 8,064
# distinct prompts (the earlier 10 names x 5 x 4 = 200 let every held-out prompt appear in a 2,000-example SFT set)
_VERBS = ("combine", "mix", "join", "fold", "merge", "blend", "apply", "pair", "calc", "compute", "mash", "fuse",
          "link", "tally", "weigh", "rate")
_ENDINGS = ("", "_nums", "_pair", "_vals", "_two", "_ab", "_items", "_terms", "_args", "_parts", "2", "_it")
TEST_COMMAND = "python3 test_mod.py"


def _module(name: str, what: str, expr: str) -> str:
    return f'def {name}(a, b):\n    """Return the {what} of a and b."""\n    return {expr}\n'


def _value(expr: str, a: int, b: int) -> int:
    return eval(expr, {}, {"a": a, "b": b})  # noqa: S307 - expr is one of _OPS's values


def _tests(name: str, expr: str, cases: list[tuple[int, int]]) -> str:
    lines = ["import unittest", f"from mod import {name}", "", "", "class T(unittest.TestCase):", "    def test(self):"]
    for a, b in cases:
        lines.append(f"        self.assertEqual({name}({a}, {b}), {_value(expr, a, b)})")
    lines += ["", "", "unittest.main()", ""]
    return "\n".join(lines)


def _cases(buggy: str, right: str, wrong: str) -> list[tuple[int, int]]:
    """Three distinct-operand cases, at least one of which the buggy module fails; drawn from a stream seeded by
    the buggy module itself, so the test file is a function of the prompt (one prompt, one content, one split)."""
    rng = random.Random(hashlib.sha256(buggy.encode()).digest())
    while True:
        cases = [(a, b) for a, b in ((rng.randint(2, 99), rng.randint(2, 99)) for _ in range(3)) if a != b]
        if cases and any(_value(right, a, b) != _value(wrong, a, b) for a, b in cases):
            return cases


class FixModule(ContentSplitTask):
    name = "fix_module"
    system = "You are a careful assistant. Fix the code in the sandbox so its tests pass."
    tools = [WRITE_FILE, RUN_SHELL]

    def candidate(self, rng: random.Random) -> Problem:
        what = rng.choice(sorted(_OPS))
        wrong = rng.choice(sorted(w for w in _OPS if w != what))
        fname = rng.choice(_VERBS) + rng.choice(_ENDINGS)
        buggy = _module(fname, what, _OPS[wrong])
        return Problem(
            id="",
            family=self.name,
            prompt=f"/work/mod.py fails its tests (/work/test_mod.py). Fix it:\n{buggy}",
            files={"/work/mod.py": buggy,
                   "/work/test_mod.py": _tests(fname, _OPS[what], _cases(buggy, _OPS[what], _OPS[wrong]))},
            answer=_module(fname, what, _OPS[what]),
        )

    def demonstration(self, problem: Problem) -> list[Message]:
        calls = [
            ToolCall(name="write_file", arguments={"path": "/work/mod.py", "content": problem.answer}),
            ToolCall(name="run_shell", arguments={"command": TEST_COMMAND}),
        ]
        return [
            Message(role="assistant", tool_calls=calls),
            Message(role="user", tool_results=["ok", "exit 0"]),
            Message(role="assistant", content="Fixed."),
        ]

    def direct_demonstration(self, problem: Problem) -> None:
        """None: the fix has to be written into the sandbox, so there is no answer without a tool call."""

    def verify(self, problem: Problem, final: str, box: ToolBox) -> float:
        """Reward = the hidden-from-edits test file passes; it is rewritten first so editing it cannot win."""
        box.write_file("/work/test_mod.py", problem.files["/work/test_mod.py"])
        return 1.0 if box.shell(TEST_COMMAND).exit_code == 0 else 0.0
