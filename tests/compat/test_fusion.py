"""The real `sandbox-fusion` client (PyPI) against dsec's SandboxFusion API on a real `dsec serve`.

Each call runs in a fresh container sandbox of the language's image. Nothing depends on speed: the time limit
test runs an endless loop, so it can only end by the limit.
"""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
import requests
import sandbox_fusion as sf
from sandbox_fusion import RunCodeRequest

import dsec


class DsecRunCodeRequest(RunCodeRequest):
    """The client's own request model plus the fields verl sends (memory_limit_MB) and dsec's trajectory key."""

    memory_limit_MB: int = -1
    trajectory_id: str | None = None
    step: int | None = None


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


def test_bash_and_perl(url):
    assert run(url, code='read x; echo "got $x" >&2; exit 4', language="bash", stdin="7\n").run_result.stderr == "got 7\n"
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

    half_key = requests.post(f"{url}/run_code", json={"code": "x", "language": "python", "trajectory_id": "t"})
    assert half_key.status_code == 422

    assert requests.get(f"{url}/run_code").status_code == 405
    assert requests.get(f"{url}/v1/ping").json() == "pong"
    assert requests.post(f"{url}/run_jupyter", json={"cells": ["1"]}).status_code == 501
