"""The real `sandbox-fusion` client (PyPI) against dsec's SandboxFusion API on a real `dsec serve`.

Each call runs in a fresh container sandbox of the language's image. Nothing depends on speed: the time limit
test runs an endless loop, so it can only end by the limit.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import requests
import sandbox_fusion as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sandbox_fusion import RunCodeRequest

import dsec

from .conftest import start_dsec_http


class DsecRunCodeRequest(RunCodeRequest):
    """The client's own request model plus the fields verl sends (memory_limit_MB) and dsec's trajectory key."""

    memory_limit_MB: int = -1
    trajectory_id: str | None = None
    step: int | None = None
    substrate: str = "container"


@pytest.fixture
def url(dsec_http) -> str:
    return dsec_http.http_url


def run(url: str, **fields) -> sf.RunCodeResponse:
    return sf.run_code(DsecRunCodeRequest(**fields), endpoint=url, max_attempts=1)


def test_success_stdout_and_execution_time(url):
    result = run(url, code="print('hello from dsec')", language="python")
    assert result.status == sf.RunStatus.Success
    assert result.compile_result is None
    assert result.run_result.status == sf.CommandRunStatus.Finished
    assert result.run_result.return_code == 0
    assert result.run_result.stdout == "hello from dsec\n"
    assert result.run_result.execution_time > 0


def test_async_client_and_set_endpoint(url):
    sf.set_endpoint(url)
    result = asyncio.run(sf.run_code_async(RunCodeRequest(code="echo $((6 * 7))", language="bash"), max_attempts=1))
    assert result.status == sf.RunStatus.Success
    assert result.run_result.stdout == "42\n"


def test_nonzero_exit_is_failed(url):
    result = run(url, code="import sys; print('partial'); sys.exit(3)", language="python")
    assert result.status == sf.RunStatus.Failed
    assert result.run_result.return_code == 3
    assert result.run_result.stdout == "partial\n"
    assert sf.summary_run_code_result(result, sf.SummaryMapping(RunFailed="run-failed")) == "run-failed"


def test_cpp_compiles_and_runs_and_reports_compile_errors(url):
    ok = run(url, code='#include <iostream>\nint main() { std::cout << "cpp " << 6 * 7 << std::endl; }', language="cpp")
    assert ok.status == sf.RunStatus.Success, ok
    assert ok.compile_result.return_code == 0
    assert ok.run_result.stdout == "cpp 42\n"

    broken = run(url, code="int main() { return 0 }", language="cpp")
    assert broken.status == sf.RunStatus.Failed
    assert broken.run_result is None, "nothing runs after a failed compile"
    assert broken.compile_result.return_code != 0
    assert "error" in broken.compile_result.stderr
    assert sf.summary_run_code_result(broken, sf.SummaryMapping(CompileFailed="compile-failed")) == "compile-failed"


def test_time_limit_kills_an_endless_loop(url):
    result = run(url, code="print('started', flush=True)\nwhile True:\n    pass\n", language="python", run_timeout=1)
    assert result.status == sf.RunStatus.Failed
    assert result.run_result.status == sf.CommandRunStatus.TimeLimitExceeded
    assert result.run_result.return_code is None
    assert result.run_result.stdout == "started\n", "output before the kill is kept"


def test_memory_limit_kills_a_program_over_it(url):
    code = "x = bytearray(400 * 1024 * 1024)\nprint('allocated', len(x))\n"
    small = run(url, code=code, language="python", memory_limit_MB=128)
    assert small.status == sf.RunStatus.Failed
    assert small.run_result.return_code == -9, small.run_result
    assert "allocated" not in small.run_result.stdout
    roomy = run(url, code=code, language="python", memory_limit_MB=1024)
    assert roomy.status == sf.RunStatus.Success, roomy


def test_stdin_files_in_and_fetch_files_out(url):
    code = (
        "import sys\n"
        "name = sys.stdin.readline().strip()\n"
        "data = open('inputs/data.bin', 'rb').read()\n"
        "open('out.txt', 'w').write(f'{name}:{len(data)}:{data[:3].hex()}')\n"
        "print('done')\n"
    )
    blob = bytes(range(256)) * 4
    result = run(url, code=code, language="python", stdin="alice\n",
                 files={"inputs/data.bin": base64.b64encode(blob).decode()}, fetch_files=["out.txt", "missing.txt"])
    assert result.status == sf.RunStatus.Success, result
    assert base64.b64decode(result.files["out.txt"]) == b"alice:1024:000102"
    assert "missing.txt" not in result.files, "a file that does not exist is left out, as SandboxFusion does"


@pytest.mark.parametrize("substrate", ["function", "microvm", "vm"])
def test_other_substrates(url, substrate):
    result = run(url, code="import sys; print(sys.stdin.read().upper(), open('f.txt').read())", language="python",
                 stdin="abc", files={"f.txt": base64.b64encode(b"file").decode()}, substrate=substrate)
    assert result.status == sf.RunStatus.Success, result
    assert result.run_result.stdout == "ABC file\n"
    loop = run(url, code="while True:\n    pass", language="python", run_timeout=1, substrate=substrate)
    assert loop.run_result.status == sf.CommandRunStatus.TimeLimitExceeded


def test_bash_and_perl(url):
    bash = run(url, code='read x; echo "got $x" >&2; exit 4', language="bash", stdin="7\n")
    assert bash.run_result.stderr == "got 7\n" and bash.run_result.return_code == 4
    assert run(url, code='print "perl ", 6*7, "\\n";', language="perl").run_result.stdout == "perl 42\n"


def test_trajectory_step_runs_once_and_replays(url, dsec_http):
    trajectory_id = f"fusion-{time.time_ns()}"
    code = "import time, random; print(time.time_ns(), random.random())"
    first = run(url, code=code, language="python", trajectory_id=trajectory_id, step=0)
    again = run(url, code=code, language="python", trajectory_id=trajectory_id, step=0)
    assert first.status == sf.RunStatus.Success
    assert again.run_result.stdout == first.run_result.stdout, "a replay returns the logged result, it does not run"
    assert again.run_result.execution_time == first.run_result.execution_time

    client = dsec.Client(dsec_http.grpc_address)
    try:
        steps = dsec.trajectory(trajectory_id, client=client).steps()
        assert [(s.step, s.kind, s.state) for s in steps] == [(0, "exec", "done")], "logged exactly once"
        nxt = run(url, code=code, language="python", trajectory_id=trajectory_id, step=1)
        assert nxt.run_result.stdout != first.run_result.stdout, "the next step runs live"
        assert len(dsec.trajectory(trajectory_id, client=client).steps()) == 2
    finally:
        client.close()

    with pytest.raises(Exception, match="409"):
        run(url, code="print('something else')", language="python", trajectory_id=trajectory_id, step=0)


def test_jupyter_cells_share_a_kernel_and_keep_their_outputs(url):
    request = sf.RunJupyterRequest(
        cells=["import sys\nx = 6 * 7", "print('x is', x)", "x + 1", "sys.stderr.write('to stderr\\n')", "1 / 0",
               "print(open('in.txt').read()); open('out.txt', 'w').write(str(x))"],
        files={"in.txt": base64.b64encode(b"from a file").decode()}, fetch_files=["out.txt"])
    result = sf.run_jupyter(request, endpoint=url, max_attempts=1)
    assert result.status == sf.RunStatus.Success, result
    assert [c.stdout for c in result.cells] == ["", "x is 42\n", "", "", "", "from a file\n"]
    assert result.cells[2].display == [{"text/plain": "43"}]
    assert result.cells[3].stderr == "to stderr\n"
    assert result.cells[4].error[0]["ename"] == "ZeroDivisionError", "an exception is the cell's error, not the run's"
    assert result.driver.stderr == "", "the driver and kernel add nothing of their own"
    assert base64.b64decode(result.files["out.txt"]) == b"42"


def test_jupyter_cell_timeout_interrupts(url):
    request = sf.RunJupyterRequest(cells=["print('before', flush=True)", "while True:\n    pass", "print('never')"],
                                   cell_timeout=1)
    result = asyncio.run(sf.run_jupyter_async(request, endpoint=url, max_attempts=1))
    assert result.status == sf.RunStatus.Failed
    assert [c.stdout for c in result.cells] == ["before\n", ""], "the cells after the one cut are not run"


def fusion_sandboxes_left(dsec_http) -> list[str]:
    """The door's sandboxes still running once their destroys are done (polled; the bound is for a wedged server)."""
    client = dsec.Client(dsec_http.grpc_address)
    try:
        def running() -> list[str]:
            return [s.id for s in client.list(labels={"dsec.compat": "sandbox-fusion"}) if s.state == "running"]

        deadline = time.monotonic() + 120
        while running() and time.monotonic() < deadline:
            time.sleep(0.2)
        return running()
    finally:
        client.close()


def test_every_call_destroys_its_sandbox(url, dsec_http):
    for code in ("print(1)", "import sys; sys.exit(2)", "while True: pass"):
        run(url, code=code, language="python", run_timeout=1)
    assert fusion_sandboxes_left(dsec_http) == []


def test_a_client_that_gives_up_ends_the_call_and_its_sandbox(url, dsec_http):
    with pytest.raises(Exception, match="[Tt]imed? ?out"):
        sf.run_code(RunCodeRequest(code="import time\ntime.sleep(600)", language="python", run_timeout=900),
                    endpoint=url, max_attempts=1, client_timeout=3)
    assert fusion_sandboxes_left(dsec_http) == [], "the hung-up call's sandbox is destroyed (it would sleep 600 s)"


def test_bad_input_gets_the_status_the_client_expects(url):
    bad_json = requests.post(f"{url}/run_code", data=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 422 and bad_json.json()["detail"][0]["type"] == "json_invalid"

    unknown = requests.post(f"{url}/run_code", json={"code": "x", "language": "cobol"})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["body", "language"]

    missing = requests.post(f"{url}/run_code", json={"language": "python"})
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "code"]

    not_object = requests.post(f"{url}/run_code", json=["python"])
    assert not_object.status_code == 422

    with pytest.raises(Exception, match="422"):
        sf.run_code(RunCodeRequest.construct(code="x", language="cobol"), endpoint=url, max_attempts=1)

    not_here = requests.post(f"{url}/run_code", json={"code": "x", "language": "go"})
    assert not_here.status_code == 200
    assert not_here.json()["status"] == "SandboxError" and "not available" in not_here.json()["message"]

    bad_file = requests.post(f"{url}/run_code", json={"code": "x", "language": "python", "files": {"a": "%%%"}})
    assert bad_file.json()["status"] == "SandboxError" and "base64" in bad_file.json()["message"]

    for raw in (b'{"code": "x", "language": "python", "run_timeout": NaN}',
                b'{"code": "x", "language": "python", "run_timeout": 1e308}',
                b'{"code": "x", "language": "python", "files": {"\\ud800": "eA=="}}',
                b'{"code": "\\udfff", "language": "python"}'):
        odd = requests.post(f"{url}/run_code", data=raw, headers={"content-type": "application/json"})
        assert odd.status_code == 422, (raw, odd.text)

    half_key = requests.post(f"{url}/run_code", json={"code": "x", "language": "python", "trajectory_id": "t"})
    assert half_key.status_code == 422

    assert requests.get(f"{url}/run_code").status_code == 405
    assert requests.get(f"{url}/v1/ping").json() == "pong"
    assert requests.post(f"{url}/submit", json={}).status_code == 501, "the dataset API is not dsec's"
    assert requests.post(f"{url}/run_jupyter", json={"cells": "1"}).status_code == 422
    assert requests.post(f"{url}/run_jupyter", json={"cells": ["1"], "kernel": "ruby"}).status_code == 422


FUZZ = settings(max_examples=80, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
FIELD_VALUES = {
    "code": st.sampled_from(["print(1)", "exit 3", ""]) | JSON,
    "language": st.sampled_from(["python", "bash", "cobol", "go", ""]) | JSON,
    "compile_timeout": st.floats(allow_nan=True) | JSON,
    "run_timeout": st.floats(allow_nan=True, allow_infinity=True) | JSON,
    "memory_limit_MB": st.integers(-(2**40), 2**40) | JSON,
    "stdin": st.text(max_size=20) | JSON,
    "files": st.dictionaries(st.text(max_size=12), st.text(max_size=12) | st.none()) | JSON,
    "fetch_files": st.lists(st.text(max_size=12), max_size=3) | JSON,
    "trajectory_id": st.text(max_size=12) | JSON,
    "step": st.integers(-(2**70), 2**70) | JSON,
    "cells": st.lists(st.text(max_size=10), max_size=2) | JSON,
    "cell_timeout": st.floats(allow_nan=True) | JSON,
    "kernel": st.sampled_from(["python3", "ruby"]) | JSON,
}
BODIES = st.one_of(
    st.fixed_dictionaries({}, optional=FIELD_VALUES).map(lambda d: json.dumps(d).encode()),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=100),
)


@FUZZ
@given(route=st.sampled_from(["/run_code", "/run_jupyter"]), body=BODIES)
def test_fuzz_run_code_and_jupyter_never_5xx(url, route, body):
    response = requests.post(f"{url}{route}", data=body, headers={"content-type": "application/json"}, timeout=120)
    assert response.status_code < 500, f"{body[:200]!r} → {response.status_code} {response.text[:300]}"
    if response.status_code != 200:
        assert "Traceback" not in response.text, "a refusal carries no traceback (a 200's stderr may: the program's)"
    else:
        assert response.json()["status"] in ("Success", "Failed", "SandboxError")


def test_server_answers_after_the_fuzz(url):
    assert run(url, code="print('still here')", language="python").run_result.stdout == "still here\n"


def test_calls_beyond_the_servers_capacity_wait_for_it():
    """With room for one sandbox, calls made while one runs wait for dsec's admission instead of failing (verl
    would count a refusal as a failed reward)."""
    root = Path(tempfile.mkdtemp(prefix="dcq-", dir="/tmp"))
    server = start_dsec_http(root, ["--max-sandboxes", "1"])
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            first = pool.submit(run, server.http_url, code="import time; time.sleep(3); print('first')",
                                language="python")
            client = dsec.Client(server.grpc_address)
            try:
                while not client.list(labels={"dsec.compat": "sandbox-fusion"}) and not first.done():
                    time.sleep(0.05)  # polled: the protocol point is the first call's sandbox existing
            finally:
                client.close()
            others = [pool.submit(run, server.http_url, code=f"print({i})", language="python") for i in range(3)]
            assert first.result().run_result.stdout == "first\n"
            assert [f.result().run_result.stdout for f in others] == ["0\n", "1\n", "2\n"]
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_auth_on_the_key_rides_in_the_endpoint_url():
    root = Path(tempfile.mkdtemp(prefix="dcf-", dir="/tmp"))  # short: sandboxes' unix sockets live under it
    tokens = root / "tokens.yaml"
    tokens.write_text("tok-fusion-0123456789: fusion\n")
    server = start_dsec_http(root, ["--tokens-file", str(tokens)])
    try:
        plain = server.http_url
        with pytest.raises(Exception, match="401"):
            run(plain, code="print(1)", language="python")
        wrong = plain.replace("http://", "http://dsec:tok-wrong@")
        with pytest.raises(Exception, match="401"):
            run(wrong, code="print(1)", language="python")
        keyed = plain.replace("http://", "http://dsec:tok-fusion-0123456789@")
        assert run(keyed, code="print('as fusion')", language="python").run_result.stdout == "as fusion\n"
        request = RunCodeRequest(code="print('async')", language="python")
        assert asyncio.run(sf.run_code_async(request, endpoint=keyed, max_attempts=1)).run_result.stdout == "async\n"
        header = requests.post(f"{plain}/run_code", json={"code": "print(2)", "language": "python"},
                               headers={"X-API-Key": "tok-fusion-0123456789"})
        assert header.json()["run_result"]["stdout"] == "2\n"
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
