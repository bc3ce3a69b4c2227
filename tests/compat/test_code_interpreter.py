"""The real `e2b-code-interpreter` SDK against dsec's `code-interpreter` template (kernel_server.py on port 49999).

Create runs the template's start command and returns once the kernel serves; every run_code goes through the
front door's port proxy to that server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from e2b import Sandbox as E2BSandbox
from e2b.exceptions import SandboxException, TimeoutException
from e2b_code_interpreter import AsyncSandbox, Sandbox

from dsec.cluster.gateway import Gateway, serve_gateway
from dsec.cluster.placement import Capacity
from dsec.compat.http_server import start_http_door
from dsec.config import ServerConfig
from dsec.images.base_images import _busybox_layer
from dsec.images.layout import DEFAULT_PATH, write_layout
from dsec.images.oci import START_COMMAND_LABEL
from dsec.images.store import LayerStore
from dsec.sdk.client import Client
from dsec.sdk.embedded import EmbeddedServer

pytestmark = pytest.mark.timeout(300)


def _options(dsec_http) -> dict:
    return {"api_key": dsec_http.api_key, "api_url": dsec_http.http_url, "sandbox_url": dsec_http.http_url}


def _create(dsec_http, **options) -> Sandbox:
    """Without a timeout the API's default (15 s, as E2B's) applies: longer than a test, shorter than a module."""
    return Sandbox.create(timeout=600, **_options(dsec_http), **options)


@pytest.fixture(scope="module")
def interpreter(dsec_http) -> Iterator[Sandbox]:
    sandbox = _create(dsec_http)  # the SDK's default template: code-interpreter-v1
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


def test_a_fork_gets_its_own_kernel_server(interpreter):
    """A container fork copies files, not processes: the door runs the start command in the fork too."""
    interpreter.run_code("open('/tmp/from-parent', 'w').write('yes')")
    (fork,) = interpreter.fork(count=1, timeout=120)
    assert isinstance(fork, Sandbox), fork
    try:
        assert fork.run_code("open('/tmp/from-parent').read()").text == "'yes'"
        assert interpreter.run_code("1 + 1").text == "2"  # the parent's server is untouched
    finally:
        fork.kill()


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


def test_a_failing_start_command_is_502_and_leaves_no_sandbox(dsec_http, tmp_path):
    """A template whose start command exits non-zero: create fails with its output, the sandbox is destroyed."""
    tag = "dsec-test-failing-start"
    store = LayerStore(ServerConfig().images_dir, ServerConfig().layer_format)
    try:
        runtime = {"Env": [DEFAULT_PATH], "Labels": {START_COMMAND_LABEL: '["sh", "-c", "echo no kernel here >&2; exit 3"]'}}
        layout = write_layout(tmp_path / "oci", [_busybox_layer(tmp_path / "layer.tar")], runtime, tag)
        store.import_oci_layout(layout, tag=tag)
    finally:
        store.close()
    client = Client(dsec_http.grpc_address, token=dsec_http.api_key)
    try:
        with pytest.raises(SandboxException, match="no kernel here"):
            E2BSandbox.create(template=tag, **_options(dsec_http))
        assert [s.id for s in client.list() if s.spec.image == tag and s.state == "running"] == []
    finally:
        client.images.rm(tag)
        client.close()


def test_code_interpreter_through_a_cluster_gateway(tmp_path):
    """The door in front of a gateway: the start command comes with SandboxInfo, run_code's port streams are
    relayed by the gateway to the sandbox's node."""
    from compat.conftest import private_home

    node = EmbeddedServer.start(private_home(tmp_path))
    gateway = Gateway()
    gateway.add_node("node-0", node.address, Capacity(cpus=8, memory_mb=8192, sandboxes=64))
    running = serve_gateway(gateway, probe_interval_s=0.5)
    door = start_http_door("127.0.0.1:0", running.address)
    try:
        sandbox = Sandbox.create(timeout=120, api_key="e2b_gw", api_url=door.url, sandbox_url=door.url)
        try:
            assert gateway.node_of(sandbox.sandbox_id) == "node-0"
            assert sandbox.run_code("x = 20\nx * 2").text == "40"
        finally:
            sandbox.kill()
    finally:
        door.stop()
        running.stop()
        node.stop()
