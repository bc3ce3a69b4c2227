"""A multi-turn repository task: one of 2-3 small modules has a bug, and only the test run says which.

Unlike fix_module, the prompt names the files but not the faulty one nor its code, so a correct episode needs the
sandbox over several turns: run the tests, read the failure (it names the file), read that file, patch its return
line with `sed` (the docstring states the intended expression), run the tests again, then answer. The patch is a
one-liner, not the whole file rewritten: a 0.3 M-parameter policy mis-copies a 100-character file far more often
than one expression (docs/trainer.md has the figures). Every file and tool output stays under the policy's result window
(`trainer.tools.MAX_RESULT_CHARS`), so what the policy reads is exactly what it needs.
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING

from trainer.encoding import Message, ToolCall
from trainer.tasks.base import ContentSplitTask, Problem, content_key
from trainer.tasks.fix_module import RUN_SHELL

if TYPE_CHECKING:
    from trainer.tools import ToolBox

TEST_FILE = "/work/test_repo.py"
TEST_COMMAND = "python3 test_repo.py"
# module names x function names: 14 x (16 x 12) choices, 2-3 modules a repository: far more prompts than any run
# draws (the configs' sizes are checked in tests/trainer/test_heldout_disjoint.py)
_MODULES = ("shapes", "money", "stats", "units", "grades", "prices", "scores", "timing", "stock", "rates", "games",
            "mixer", "ledger", "meter")
_VERBS = ("area", "total", "scale", "shift", "offset", "tax", "score", "cost", "fee", "rank", "span", "bonus",
          "level", "speed", "grow", "trim")
_ENDINGS = ("", "_of", "_for", "_by", "_val", "_sum", "_all", "2", "_at", "_pair", "_est", "_raw")
_OPS = ("+", "-", "*")
_VERDICT = "print(f'{bad} failed' if bad else 'all passed')"


def _expr(op1: str, op2: str, const: int) -> str:
    return f"a {op1} b {op2} {const}"


def _value(expr: str, a: int, b: int) -> int:
    return eval(expr, {}, {"a": a, "b": b})  # noqa: S307 - built by _expr from _OPS and an int


def _module(repo: str, func: str, right: str, body: str) -> str:
    """The docstring states the intended expression: the fix is readable from the file, not guessed.

    The first line names the repository (its modules and functions, as the prompt does), so every file is a
    function of its problem's prompt: no file of a held-out problem appears in a training problem either.
    """
    return f'# repo: {repo}\ndef {func}(a, b):\n    """Return {right}."""\n    return {body}\n'


def _tests(entries: list[tuple[str, str, str, list[tuple[int, int]]]]) -> str:
    """A plain script (no unittest banner) whose failure line names the file, within the result window."""
    # no bytecode cache: a fix written in the same second as the buggy file, with the same size, would otherwise
    # be shadowed by the stale .pyc of the first run
    lines = ["import sys", "", "sys.dont_write_bytecode = True"]
    lines += [f"from {mod} import {func}" for mod, func, _, _ in entries]
    lines += ["", "CASES = ["]
    for mod, func, right, cases in entries:
        lines += [f"    ({mod + '.py'!r}, {func!r}, {func}, ({a}, {b}), {_value(right, a, b)})," for a, b in cases]
    lines += ["]", "bad = 0", "for path, name, fn, args, want in CASES:", "    got = fn(*args)",
              "    if got != want:", "        bad += 1",
              "        print(f'FAIL {path}: {name}{args} = {got}, want {want}')",
              _VERDICT, "sys.exit(1 if bad else 0)", ""]
    return "\n".join(lines)


def patch(name: str, right: str) -> str:
    """The shell one-liner that replaces the module's return line (only code lines start lowercase `return`)."""
    return f"sed -i 's/return .*/return {right}/' {name}"


def _cases(rng: random.Random, right: str, wrong: str | None) -> list[tuple[int, int]]:
    """Two cases; for the buggy function the first one fails (so the test run names its file)."""
    while True:
        cases = [(rng.randint(2, 20), rng.randint(2, 20)) for _ in range(2)]
        if wrong is None or _value(right, *cases[0]) != _value(wrong, *cases[0]):
            return cases


class FixRepo(ContentSplitTask):
    name = "fix_repo"
    system = "You are a careful assistant. Find the bug in the repository in the sandbox and fix it."
    tools = [RUN_SHELL]  # every step is a shell command; an unused write_file schema would only lengthen the prompt

    def candidate(self, rng: random.Random) -> Problem:
        count = rng.choice((2, 3))
        mods = rng.sample(_MODULES, count)
        funcs: list[str] = []
        while len(funcs) < count:
            name = rng.choice(_VERBS) + rng.choice(_ENDINGS)
            if name not in funcs:
                funcs.append(name)
        repo = " ".join(f"{m}.{f}" for m, f in zip(mods, funcs))
        prompt = (f"Repository /work: {', '.join(f'{m}.py ({f})' for m, f in zip(mods, funcs))}, test_repo.py. "
                  f"`{TEST_COMMAND}` fails; fix the code, not the tests.")
        # everything else is drawn from a stream seeded by the prompt, so one prompt is one content (one split)
        body_rng = random.Random(hashlib.sha256(prompt.encode()).digest())
        buggy = body_rng.randrange(count)
        files: dict[str, str] = {}
        entries = []
        data: dict[str, object] = {}
        for i, (mod, func) in enumerate(zip(mods, funcs)):
            op1, op2, const = body_rng.choice(_OPS), body_rng.choice(_OPS), body_rng.randint(1, 9)
            right = _expr(op1, op2, const)
            body = right
            if i == buggy:
                body = self._bug(body_rng, op1, op2, const)
                path = f"/work/{mod}.py"
                cases = _cases(body_rng, right, body)
                fails = [f"FAIL {mod}.py: {func}({a}, {b}) = {_value(body, a, b)}, want {_value(right, a, b)}"
                         for a, b in cases if _value(body, a, b) != _value(right, a, b)]
                data = {"path": path, "func": func, "fixed": _module(repo, func, right, right), "right": right,
                        "output": "".join(f"{line}\n" for line in fails) + f"{len(fails)} failed\n"}
            else:
                cases = _cases(body_rng, right, None)
            files[f"/work/{mod}.py"] = _module(repo, func, right, body)
            entries.append((mod, func, right, cases))
        files[TEST_FILE] = _tests(entries)
        return Problem(id="", family=self.name, prompt=prompt, files=files, answer=str(data["fixed"]), data=data)

    @staticmethod
    def _bug(rng: random.Random, op1: str, op2: str, const: int) -> str:
        """One change: an operator or the constant (the tests below make sure it shows)."""
        kind = rng.randrange(3)
        if kind == 0:
            return _expr(rng.choice([o for o in _OPS if o != op1]), op2, const)
        if kind == 1:
            return _expr(op1, rng.choice([o for o in _OPS if o != op2]), const)
        return _expr(op1, op2, rng.choice([c for c in range(1, 10) if c != const]))

    def demonstration(self, problem: Problem) -> list[Message]:
        """Run the tests, read the file the failure names, patch its return line and re-run the tests: four calls."""
        name = str(problem.data["path"]).rsplit("/", 1)[1]
        buggy = problem.files[str(problem.data["path"])]
        test = ToolCall(name="run_shell", arguments={"command": TEST_COMMAND})
        return [
            Message(role="assistant", tool_calls=[test]),
            Message(role="user", tool_results=[f"exit 1\n{problem.data['output']}"]),
            Message(role="assistant", tool_calls=[ToolCall(name="run_shell", arguments={"command": f"cat {name}"})]),
            Message(role="user", tool_results=[f"exit 0\n{buggy}"]),
            Message(role="assistant", tool_calls=[ToolCall(name="run_shell", arguments={"command": patch(name, str(
                problem.data["right"]))}), test]),
            Message(role="user", tool_results=["exit 0", "exit 0\nall passed\n"]),
            Message(role="assistant", content="Fixed."),
        ]

    def direct_demonstration(self, problem: Problem) -> None:
        """None: the fix has to be written into the sandbox, so there is no answer without a tool call."""

    def verify(self, problem: Problem, final: str, box: ToolBox) -> float:
        """Reward = the hidden tests reach their own verdict line and exit 0.

        The modules without the bug are restored, and the tests are written afresh with a verdict line carrying a
        token derived from the problem that the policy never saw, so editing the tests or another file cannot win,
        nor can a module that prints "all passed" and exits on import. (A module that reads its caller's source
        could still forge it: a hack far beyond the tiny policy, and visible in the trajectory log.)
        """
        for path, content in problem.files.items():
            if path not in (problem.data["path"], TEST_FILE):
                box.write_file(path, content)
        token = hashlib.sha256(f"verify/{content_key(problem)}".encode()).hexdigest()[:16]
        verdict = f"all passed {token}"
        box.write_file(TEST_FILE, problem.files[TEST_FILE].replace(_VERDICT, _VERDICT.replace("all passed", verdict)))
        result = box.shell(f"rm -rf __pycache__ && {TEST_COMMAND}")  # a cache the policy's own imports left
        passed = result.stdout.decode(errors="replace").rstrip().endswith(verdict)
        return 1.0 if result.exit_code == 0 and passed else 0.0
