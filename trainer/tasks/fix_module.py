"""A file task: one function in a small module uses the wrong operator; make its unit tests pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.encoding import Message, ToolCall, ToolSchema
from trainer.tasks.base import Problem, Split, problem_rng

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

# what the docstring promises, the correct expression, and the python operator
_OPS = {
    "sum": "a + b",
    "difference": "a - b",
    "product": "a * b",
    "maximum": "max(a, b)",
    "minimum": "min(a, b)",
}
_NAMES = ("combine", "mix", "join", "fold", "merge", "blend", "apply", "reduce2", "pair", "calc")
TEST_COMMAND = "python3 test_mod.py"


def _module(name: str, what: str, expr: str) -> str:
    return f'def {name}(a, b):\n    """Return the {what} of a and b."""\n    return {expr}\n'


def _tests(name: str, expr: str, cases: list[tuple[int, int]]) -> str:
    lines = ["import unittest", f"from mod import {name}", "", "", "class T(unittest.TestCase):", "    def test(self):"]
    for a, b in cases:
        lines.append(f"        self.assertEqual({name}({a}, {b}), {eval(expr, {}, {'a': a, 'b': b})})")  # noqa: S307
    lines += ["", "", "unittest.main()", ""]
    return "\n".join(lines)


class FixModule:
    name = "fix_module"
    system = "You are a careful assistant. Fix the code in the sandbox so its tests pass."
    tools = [WRITE_FILE, RUN_SHELL]

    def generate(self, split: Split, index: int, seed: int) -> Problem:
        rng = problem_rng(self.name, split, index, seed)
        what = rng.choice(sorted(_OPS))
        wrong = rng.choice(sorted(w for w in _OPS if _OPS[w] != _OPS[what]))
        fname = rng.choice(_NAMES)
        cases = [(rng.randint(2, 99), rng.randint(2, 99)) for _ in range(3)]
        cases = [(a, b) for a, b in cases if a != b] or [(3, 7)]
        buggy = _module(fname, what, _OPS[wrong])
        return Problem(
            id=f"{self.name}-{split}-{index}",
            family=self.name,
            prompt=f"/work/mod.py fails its tests (/work/test_mod.py). Fix it:\n{buggy}",
            files={"/work/mod.py": buggy, "/work/test_mod.py": _tests(fname, _OPS[what], cases)},
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
