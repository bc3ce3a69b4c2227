"""A substrate is a plug-in: one file registers it (tests/core/plugin_substrate.py) and the server, models, CLI
and orphan sweep know it; the conformance suite's basic cases run on it unchanged."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import dsec
from dsec.cli import build_parser
from dsec.config import ServerConfig
from dsec.errors import InvalidSpec
from dsec.models import SandboxSpec
from dsec.server.drivers import DriverRegistry
from dsec.substrates import registry

from .leftovers import leftovers
from .test_conformance import (  # noqa: F401 - collected here, run on the `sandbox` fixture below
    test_command_not_found,
    test_destroyed_sandbox_gives_typed_errors,
    test_exec_argv_env_cwd_stdin,
    test_exec_stdout_stderr_exit_code,
    test_file_errors_are_typed,
    test_files_write_read_list_large,
    test_session_keeps_cwd_env_and_variables,
    test_upload_and_download_trees,
)

PLUGIN = Path(__file__).with_name("plugin_substrate.py")
NAME = "relabel"  # plugin_substrate.NAME: the module is loaded by the registry, never imported here


@pytest.fixture(scope="module")
def client():
    """An embedded server started with the plug-in named in its environment (the SDK process reads it too)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(registry.MODULES_ENV, str(PLUGIN))
        registry.discover()
        c = dsec.Client()
    yield c
    c.close()


@pytest.fixture
def sandbox(client):
    sb = client.create("busybox", NAME, memory_mb=256, timeout_s=600)
    yield sb
    try:
        sb.destroy()
    except dsec.DsecError:
        pass


def test_the_registry_lists_it_everywhere(client):
    assert NAME in registry.names()
    assert SandboxSpec(substrate=NAME).substrate == NAME
    choices = next(a.choices for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions
                   if a.dest == "substrate")
    assert NAME in choices and set(registry.names()) <= set(choices)
    drivers = DriverRegistry(ServerConfig())
    assert drivers.name_for(SandboxSpec(substrate=NAME)) == "relabel-crun"
    with pytest.raises(InvalidSpec, match="crun"):
        drivers.name_for(SandboxSpec(substrate=NAME, driver="runc"))


def test_unknown_substrate_is_a_typed_error_listing_the_registered(client):
    with pytest.raises(dsec.InvalidSpec, match=f"registered substrates: .*{NAME}"):
        client.create("busybox", "no-such-substrate")


def test_sandbox_reports_its_substrate_and_driver(client, sandbox):
    info = sandbox.refresh()
    assert (info.spec.substrate, info.driver) == (NAME, "relabel-crun")
    assert sandbox.id in [i.id for i in client.list()]


def test_call_needs_the_call_capability(sandbox):
    with pytest.raises(dsec.InvalidSpec, match="function"):
        sandbox.call(len, "x")


def test_destroy_leaves_nothing(client):
    sb = client.create("busybox", NAME)
    sb.exec("sleep 1000 >/dev/null 2>&1 &")
    assert leftovers(sb.id), "a live sandbox is visible on the host (sanity check of the probe)"
    sb.destroy()
    deadline = time.monotonic() + 20.0  # bounds failure only: destroy returns once the container is gone
    while (found := leftovers(sb.id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert found == []


def test_sweepers_run_once_each_in_stage_order():
    sweepers = registry.sweepers()
    assert len({id(s) for s in sweepers}) == len(sweepers)
    assert [s.stage for s in sweepers] == sorted(s.stage for s in sweepers)
    kinds = {kind for s in sweepers for kind in s.kinds}
    assert {"cgroups", "loops", "qemus", "containers", "netns", "nft_tables"} <= kinds


def test_register_refuses_a_clash():
    taken = registry.Substrate(name="clash", drivers={"crun": "crun"}, default_driver=lambda c: "crun",
                               factory=lambda name, config, drivers: drivers.get("crun"))
    with pytest.raises(ValueError, match="belong to 'container'"):
        registry.register(taken)
    with pytest.raises(ValueError, match="capabilities"):
        registry.Substrate(name="x", drivers={}, default_driver=lambda c: "", factory=taken.factory,
                           capabilities=frozenset({"teleport"}))
    assert "clash" not in registry.names()
