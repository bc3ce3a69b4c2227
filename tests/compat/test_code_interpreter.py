"""The real `e2b-code-interpreter` SDK against dsec's `code-interpreter` template (kernel_server.py on port 49999).

Create runs the template's start command and returns once the kernel serves; every run_code goes through the
front door's port proxy to that server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from e2b.exceptions import TimeoutException
from e2b_code_interpreter import AsyncSandbox, Sandbox

pytestmark = pytest.mark.timeout(300)


def _options(dsec_http) -> dict:
    return {"api_key": dsec_http.api_key, "api_url": dsec_http.http_url, "sandbox_url": dsec_http.http_url}


@pytest.fixture(scope="module")
def interpreter(dsec_http) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(**_options(dsec_http))  # the SDK's default template: code-interpreter-v1
    try:
        yield sandbox
    finally:
        sandbox.kill()


def test_run_code_returns_results_and_stdout(interpreter):
    seen: list[str] = []
    execution = interpreter.run_code("import sys\nprint('hi')\nprint('oops', file=sys.stderr)\n6 * 7", on_stdout=lambda m: seen.append(m.line))
    assert execution.error is None
    assert execution.text == "42"
    assert execution.results[0].is_main_result
    assert execution.logs.stdout == ["hi\n"] and execution.logs.stderr == ["oops\n"]
    assert seen == ["hi\n"]
    display = interpreter.run_code("from IPython.display import HTML, display\ndisplay(HTML('<b>x</b>'))")
    assert display.results[0].html == "<b>x</b>" and not display.results[0].is_main_result


def test_state_persists_between_calls(interpreter):
    interpreter.run_code("counter = 10")
    interpreter.run_code("counter += 5")
    execution = interpreter.run_code("counter")
    assert execution.text == "15"
    assert execution.execution_count is not None and execution.execution_count >= 3


def test_error_cell_gives_execution_error(interpreter):
    execution = interpreter.run_code("def f():\n    return 1 / 0\nf()")
    assert execution.error is not None
    assert execution.error.name == "ZeroDivisionError"
    assert execution.error.value == "division by zero"
    assert "ZeroDivisionError" in execution.error.traceback
    assert interpreter.run_code("'still alive'").text == "'still alive'"


def test_contexts_are_separate_kernels_with_envs(interpreter):
    context = interpreter.create_code_context(cwd="/tmp")
    assert context.language == "python" and context.cwd == "/tmp"
    assert context.id in [c.id for c in interpreter.list_code_contexts()]
    interpreter.run_code("secret = 1")
    assert interpreter.run_code("'secret' in globals()", context=context).text == "False"
    cwd_and_env = interpreter.run_code("import os\nos.getcwd(), os.environ.get('GREETING')", context=context, envs={"GREETING": "hi"})
    assert cwd_and_env.text == "('/tmp', 'hi')"
    assert interpreter.run_code("os.environ.get('GREETING')", context=context).text is None  # envs last one call
    interpreter.run_code("kept = 1", context=context)
    interpreter.restart_code_context(context)
    assert interpreter.run_code("'kept' in globals()", context=context).text == "False"
    interpreter.remove_code_context(context)
    assert context.id not in [c.id for c in interpreter.list_code_contexts()]


def test_timeout_interrupts_the_cell_and_the_kernel_stays(interpreter):
    interpreter.run_code("survivor = 'yes'")
    with pytest.raises(TimeoutException):
        interpreter.run_code("import time\ntime.sleep(600)", timeout=2)
    # the client's disconnect interrupted the kernel: the next cell runs, and the state is intact
    assert interpreter.run_code("survivor", timeout=120).text == "'yes'"


def test_unsupported_language_is_an_error(interpreter):
    with pytest.raises(Exception, match="only python"):
        interpreter.run_code("console.log(1)", language="javascript")


def test_async_sandbox_run_code(dsec_http):
    async def scenario() -> str | None:
        sandbox = await AsyncSandbox.create(**_options(dsec_http))
        try:
            return (await sandbox.run_code("sum(range(10))")).text
        finally:
            await sandbox.kill()

    assert asyncio.run(scenario()) == "45"
