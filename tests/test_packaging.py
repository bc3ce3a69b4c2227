"""`pip install dsec` is a light client: a wheel built from this tree, installed with only its base dependencies
into a fresh venv, runs a sandbox against a real server, has none of the server's or trainer's packages, and its
server package (the SDK's embedded server included) says which extra is missing instead of failing deep inside."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsec.sdk.embedded import EmbeddedServer

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "dsec", "trainer", "proto")
# server, trainer and test packages the client must not pull in
HEAVY = ("docker", "yaml", "prometheus_client", "starlette", "uvicorn", "connectrpc", "ray", "torch", "tqdm",
         "grpc_tools")
DEADLINE_S = 170  # the whole build + install: pip reuses its cache, so this only bounds a hang


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_S, **kwargs)
    tail = f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{command[:4]} exited {result.returncode}:\n{tail}"
    return result


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh venv (no system site-packages) holding a wheel of this tree and only its base dependencies."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(origin, source / name)
    # no build isolation: the build needs setuptools and grpcio-tools (setup.py generates the stubs), both in .venv
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"),
          str(source)])
    wheel = next((work / "dist").glob("dsec-*.whl"))
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])  # a venv made from .venv's python still sees no site-packages
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)])
    return venv


def _python(venv: Path, code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("DSEC_ADDRESS", "PYTHONPATH")}
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          timeout=DEADLINE_S, cwd=venv, env={**clean, **(env or {})})


def test_base_install_has_no_server_or_trainer_packages(client_venv: Path) -> None:
    code = ("import importlib.util, dsec; from dsec.sdk.client import Client; "
            f"print(' '.join(m for m in {HEAVY!r} if importlib.util.find_spec(m) is not None))")
    result = _python(client_venv, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"a client-only install pulled in: {result.stdout.strip()}"


def test_client_only_install_runs_a_sandbox_on_a_real_server(client_venv: Path) -> None:
    server = EmbeddedServer.start()
    try:
        code = ("import dsec\n"
                "with dsec.Sandbox.create(image='busybox', substrate='container', labels={'by': 'packaging'}) as sb:\n"
                "    print(sb.exec('echo light client').stdout.decode().strip())\n"
                "    import subprocess, sys\n"
                "    cli = [sys.prefix + '/bin/dsec', 'ls', '--label', 'by=packaging']\n"
                "    print(subprocess.run(cli, check=True, capture_output=True, text=True).stdout.count(sb.id))\n")
        result = _python(client_venv, code, env={"DSEC_ADDRESS": server.address})
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["light", "client", "1"], result.stdout  # the CLI's `ls` saw the sandbox too


@pytest.mark.parametrize("code", [
    "import dsec.server.main",
    "import dsec; dsec.Client()",  # no address: the embedded server would need the server extra
])
def test_server_without_its_extra_names_the_extra(client_venv: Path, code: str) -> None:
    result = _python(client_venv, code)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: the dsec server needs the `server` extra"), result.stderr
    assert "pip install 'dsec[server]'" in last
