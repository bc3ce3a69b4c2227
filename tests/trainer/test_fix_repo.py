"""fix_repo: a multi-turn repository task. Generation is a function of content, the family has thousands of
problems, and its demonstration, replayed through the real tools in a dsec sandbox, gets exactly the results it
claims and passes the verifier; wrong fixes and edited tests score 0."""

from __future__ import annotations

import random
import time

import pytest

import dsec
from trainer.data import demo_pieces, problems
from trainer.tasks import get_task
from trainer.tasks.base import HELDOUT_SHARE, content_key
from trainer.tasks.fix_repo import TEST_FILE
from trainer.tools import MAX_RESULT_CHARS, open_toolbox

TASK = get_task("fix_repo")


def test_generation_is_deterministic_and_the_prompt_fixes_the_content():
    assert TASK.candidate(random.Random(5)) == TASK.candidate(random.Random(5))
    assert TASK.generate("train", 7, 0) == TASK.generate("train", 7, 0)
    by_prompt: dict[str, str] = {}
    for p in problems(["fix_repo"], "train", 500, 0) + problems(["fix_repo"], "heldout", 200, 0):
        assert by_prompt.setdefault(p.prompt, content_key(p)) == content_key(p)


def test_thousands_of_distinct_problems_with_the_bug_in_varying_files():
    held = problems(["fix_repo"], "heldout", 1000, 0)
    train = problems(["fix_repo"], "train", int(1000 * (1 - HELDOUT_SHARE) / HELDOUT_SHARE), 0)
    everything = train + held
    assert len({content_key(p) for p in everything}) == len(everything) >= 4000
    assert {len(p.files) for p in everything} == {3, 4}  # 2 or 3 modules and the test file
    positions = {sorted(p.files).index(str(p.data["path"])) for p in everything}
    assert positions >= {0, 1, 2}  # the faulty module is not always the same one
    assert len({p.data["path"] for p in everything}) >= 10


def test_the_demonstration_is_multi_turn_and_fits_the_result_window():
    for p in problems(["fix_repo"], "train", 300, 1):
        demo = TASK.demonstration(p)
        calls = [c for m in demo if m.role == "assistant" for c in m.tool_calls]
        assert len(calls) >= 3 and [c.name for c in calls][:2] == ["run_shell", "run_shell"]
        assert calls[2].arguments["command"].startswith("sed -i ")  # a one-line patch, not the file rewritten
        assert sum(1 for m in demo if m.role == "assistant" and m.tool_calls) >= 3  # three turns, not one
        results = [r for m in demo if m.role == "user" for r in m.tool_results]
        assert all(len(r) <= MAX_RESULT_CHARS for r in results)  # the policy sees every result whole
        assert p.prompt.count(".py") >= 3 and p.files[str(p.data["path"])] not in p.prompt
    assert any(text for text, trainable in demo_pieces(p, "non-think") if trainable)


@pytest.fixture
def client(dsec_server):
    c = dsec.Client(address=dsec_server.address)
    yield c
    c.close()


def _box(client, problem):
    box = open_toolbox(client, f"test-{time.time_ns()}/fix_repo", image="python", substrate="container",
                       timeout_s=30, sandbox_timeout_s=300)
    for path, content in problem.files.items():
        box.write_file(path, content)
    return box


@pytest.mark.timeout(600)
def test_the_demonstration_solves_sampled_problems_through_the_real_tools(client):
    for p in problems(["fix_repo"], "heldout", 3, 0) + problems(["fix_repo"], "train", 2, 3):
        box = _box(client, p)
        try:
            demo = TASK.demonstration(p)
            for turn, answer in zip(demo[0::2], demo[1::2]):
                if not turn.tool_calls:
                    break
                assert [box.execute(c) for c in turn.tool_calls] == answer.tool_results, p.id
            path = str(p.data["path"])
            assert box.shell(f"cat {path}").stdout.decode() == p.answer  # the patch changed the return line only
            assert demo[-1].content and TASK.verify(p, demo[-1].content, box) == 1.0
        finally:
            box.close()


@pytest.mark.timeout(300)
def test_wrong_fixes_and_edited_tests_score_zero(client):
    p = TASK.generate("heldout", 11, 0)
    path = str(p.data["path"])
    others = [f for f in p.files if f not in (path, TEST_FILE)]
    box = _box(client, p)
    try:
        assert TASK.verify(p, "Fixed.", box) == 0.0  # nothing done
        wrong = p.answer.replace("return a", "return b", 1)
        box.write_file(path, wrong)
        assert TASK.verify(p, "Fixed.", box) == 0.0  # a wrong fix
        box.write_file(TEST_FILE, "print('all passed')\n")
        assert TASK.verify(p, "Fixed.", box) == 0.0  # editing the tests: they are restored first
        box.write_file(path, "import sys\nprint('all passed')\nsys.exit(0)\n")
        assert TASK.verify(p, "Fixed.", box) == 0.0  # a module that ends the run on import
        box.write_file(path, p.files[path])
        module = path.rsplit("/", 1)[1].removesuffix(".py")
        assert box.shell(f"python3 -c 'import {module}'").exit_code == 0  # leaves a .pyc of the buggy module
        box.write_file(path, p.answer)  # same size, likely the same second: the stale .pyc must not count
        box.write_file(others[0], "raise SystemExit(1)\n")  # breaking a file without the bug is undone
        assert TASK.verify(p, "Fixed.", box) == 1.0
    finally:
        box.close()
