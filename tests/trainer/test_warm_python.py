"""The warm interpreter (trainer/warm_python.py) gives the task families' `python3` runs the real interpreter's
results byte for byte: stdout, stderr and exit status of every tool and verifier command, on generated problems
of every family, in a sandbox with it and one without, through the real dsec server and container sandboxes."""

from __future__ import annotations

import re
import shlex
import time

import pytest

import dsec
from trainer import warm_python
from trainer.data import problems
from trainer.tasks import get_task
from trainer.tasks.base import content_key
from trainer.tasks.fix_repo import _VERDICT, TEST_FILE, patch

PER_FAMILY = 64  # 200 a family passed too (7 min at load average 16-20); 64 keeps the file near 2-3 min
# unittest prints how long its tests took; the only part of these outputs that varies from run to run
_TIMING = re.compile(rb"Ran (\d+) tests? in \d+\.\d+s")


@pytest.fixture
def client(dsec_server):
    c = dsec.Client(address=dsec_server.address)
    yield c
    c.close()


def _write(path: str, content: str) -> str:
    return f"cat > {shlex.quote(path)} <<'DSEC_EOF'\n{content}\nDSEC_EOF"


def _calls(family: str, index: int) -> list[str]:
    """The family's tool and verifier commands (and a few wrong ones) for one problem, in its own directory."""
    task = get_task(family)
    problem = task.generate("train", index, 0)
    here = f"/work/p{index}"
    files = [_write(here + path.removeprefix("/work"), content) for path, content in problem.files.items()]
    if family == "arithmetic":
        expr = str(problem.data["expr"])
        codes = [f"print({expr})", f"print({expr}", f"x = {expr}\nprint(x / 0)", "import sys; sys.exit(f'{7}')"]
        codes += [f"import sys\nsys.stdout.write('1' if {answer!r} == str({expr}) else '0')"
                  for answer in (problem.answer, problem.answer + "1")]
        return files + [shlex.join(["python3", "-c", code]) for code in codes]
    if family == "fix_module":
        return files + ["python3 test_mod.py", _write(f"{here}/mod.py", problem.answer), "rm -rf __pycache__",
                        "python3 test_mod.py", "python3 -c 'import mod; print(mod.__file__)'"]
    name = str(problem.data["path"]).rsplit("/", 1)[1]
    token = f"all passed {content_key(problem)[:16]}"
    verifier = problem.files[TEST_FILE].replace(_VERDICT, _VERDICT.replace("all passed", token))
    return files + ["python3 test_repo.py", f"cat {name}", patch(name, str(problem.data["right"])),
                    "python3 test_repo.py", _write(f"{here}/test_repo.py", verifier),
                    "rm -rf __pycache__ && python3 test_repo.py", "python3 nope.py"]


def _script(family: str, index: int) -> str:
    """One shell script per problem; each call's status is marked on both streams so a difference is placed."""
    lines = [f"mkdir -p /work/p{index} && cd /work/p{index} || exit 99"]
    for call in _calls(family, index):
        lines += [call, 's=$?; echo "== $s"; echo "== $s" >&2']
    return "\n".join(lines)


def _outcome(sandbox: dsec.Sandbox, script: str) -> tuple[bytes, bytes, int]:
    result = sandbox.exec(script, timeout=120, cwd="/")
    return _TIMING.sub(rb"Ran \1 tests in T", result.stdout), _TIMING.sub(rb"Ran \1 tests in T", result.stderr), \
        result.exit_code


def _warm(client: dsec.Client) -> dsec.Sandbox:
    sandbox = client.create(image="python", substrate="container", timeout_s=1200)
    warm_python.start(sandbox, ("unittest",))
    deadline = time.monotonic() + 60  # bounds a failure only: the loop ends when the shim is installed
    while sandbox.exec(["test", "-x", warm_python.SHIM]).exit_code != 0:
        assert time.monotonic() < deadline, "the warm interpreter did not install its shim in 60 s"
    return sandbox


@pytest.mark.timeout(900)
def test_tool_and_verifier_runs_are_byte_identical_to_the_real_interpreter(client):
    cold = client.create(image="python", substrate="container", timeout_s=1200)
    warm = _warm(client)
    try:
        assert cold.exec(["test", "-e", warm_python.SHIM]).exit_code != 0
        # the calls below do run in forks of the warm interpreter: their parent is it
        parent = warm.exec(["python3", "-c", "import os; print(os.getppid())"]).stdout.strip()
        assert parent == warm.files.read(f"{warm_python.DIR}/pid").strip()
        compared = 0
        for family in ("arithmetic", "fix_module", "fix_repo"):
            for index in range(PER_FAMILY):
                script = _script(family, index)
                expected, got = _outcome(cold, script), _outcome(warm, script)
                assert got == expected, f"{family} problem {index}: warm {got!r} != real {expected!r}"
                compared += script.count("python3 ")
        assert compared > 3 * PER_FAMILY * 3
    finally:
        cold.destroy()
        warm.destroy()


@pytest.mark.timeout(300)
def test_forms_it_does_not_reproduce_run_the_real_interpreter_and_a_timeout_kills_the_call(client):
    sandbox = _warm(client)
    try:
        pid = sandbox.files.read(f"{warm_python.DIR}/pid").strip()
        ppid = "import os; print(os.getppid())"
        # options, another environment, a file as stdout: the real interpreter, started by the shim (its parent)
        for command in (["python3", "-S", "-c", ppid], ["env", "PYTHONHASHSEED=1", "python3", "-c", ppid]):
            assert sandbox.exec(command).stdout.strip() != pid
        assert sandbox.exec(f"python3 -c {shlex.quote(ppid)} > /tmp/o; cat /tmp/o").stdout.strip() != pid
        # a call past its tool timeout is killed with its caller, and the next call runs
        sleeper = "import time, os; open('/tmp/child', 'w').write(str(os.getpid())); time.sleep(600)"
        result = sandbox.exec(["python3", "-c", sleeper], timeout=2)
        assert result.timed_out
        child = sandbox.files.read("/tmp/child").decode()
        deadline = time.monotonic() + 30  # bounds a failure only: the parent reaps it when its caller dies
        while sandbox.exec(["test", "-d", f"/proc/{child}"]).exit_code == 0:
            assert time.monotonic() < deadline, "the timed-out call's process outlived its caller"
        assert sandbox.exec(["python3", "-c", "print(6 * 7)"]).stdout == b"42\n"
    finally:
        sandbox.destroy()
