"""Ready templates (issue #20 point 2): an image + start command + readiness probe, started once, waited on until
the probe passes and snapshotted; a create naming the template returns with the service already answering (a
container re-runs the start command over its files, a microVM resumes with it running in memory). A probe that
never passes, or a start command that dies, is SandboxNotReady with nothing left behind; templates are per tenant
and outlive a server restart; a template's snapshot is pinned."""

from __future__ import annotations

import time
import uuid

import pytest

import dsec
from dsec.config import ServerConfig
from dsec.errors import InvalidSpec, SandboxNotReady, TemplateExists, TemplateNotFound
from dsec.server.main import serve

pytestmark = pytest.mark.timeout(600)

TOKENS = {"tpl-alice": "tok-tpl-alice-1", "tpl-bob": "tok-tpl-bob-2"}
# The service comes up a moment after its start command starts (and notes each start in a file it keeps): a
# create that returned before it listened would fail the GET below.
START = ["sh", "-c", "echo started >> /root/starts && sleep 1 && exec python3 -m http.server 8000 --bind 127.0.0.1"]
GET = ["python3", "-c", "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/').status)"]


def _config() -> ServerConfig:
    return ServerConfig(listen="127.0.0.1:0", tokens=",".join(f"{t}:{n}" for n, t in TOKENS.items()))


@pytest.fixture(scope="module")
def server():
    running = serve(_config())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def alice(server):
    with dsec.Client(server.address, token=TOKENS["tpl-alice"]) as client:
        yield client


@pytest.fixture(scope="module")
def bob(server):
    with dsec.Client(server.address, token=TOKENS["tpl-bob"]) as client:
        yield client


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _nothing_left(client: dsec.Client, name: str) -> None:
    assert not client.list({"dsec.template-builder": name})
    assert not [s for s in client.snapshots() if s.name == f"template:{name}"]
    assert name not in [t.name for t in client.templates.list()]


@pytest.mark.parametrize("substrate,ready", [
    pytest.param("container", {"tcp_port": 8000}, id="container-tcp"),
    pytest.param("container", {"command": GET}, id="container-command"),
    pytest.param("microvm", {"tcp_port": 8000}, id="microvm-tcp"),
])
def test_create_from_template_returns_with_the_service_answering(alice, substrate, ready):
    name = _name()
    info = alice.templates.create(name, image="python", substrate=substrate, start=START, ready=ready,
                                  memory_mb=256)
    try:
        assert (info.name, info.substrate, info.start) == (name, substrate, START)
        if substrate == "microvm":
            assert info.snapshot_kind == "memory+disk"  # a container's is whatever its driver's snapshot() takes
        assert alice.templates.get(name) == info
        assert [s.pinned for s in alice.snapshots() if s.snapshot_id == info.snapshot_id] == [True]
        assert not alice.list({"dsec.template-builder": name})  # the builder is gone

        with alice.create(template=name, labels={"case": name}) as sandbox:
            first = sandbox.exec(GET)  # the first request, no retry: ready means answering
            assert (first.exit_code, first.stdout) == (0, b"200\n"), first.stderr
            assert sandbox.info.spec.template == name and sandbox.info.spec.labels["case"] == name
            assert sandbox.info.spec.substrate == substrate
            assert "ready" in sandbox.info.timings_ms
            # memory came back with the service running; a files snapshot re-ran the start command
            starts = sandbox.files.read("/root/starts").decode().splitlines()
            assert len(starts) == (1 if "memory" in info.snapshot_kind else 2)
        with pytest.raises(InvalidSpec):
            alice.delete_snapshot(info.snapshot_id)  # pinned: it goes with its template
    finally:
        alice.templates.delete(name)
    assert info.snapshot_id not in [s.snapshot_id for s in alice.snapshots()]
    with pytest.raises(TemplateNotFound):
        alice.create(template=name)


def test_probe_that_never_passes_is_typed_within_its_deadline_and_leaves_nothing(alice):
    name = _name()
    began = time.monotonic()
    with pytest.raises(SandboxNotReady) as caught:
        alice.templates.create(name, image="python", start=["sleep", "3600"],
                               ready={"tcp_port": 8000, "timeout_s": 3, "interval_s": 0.5})
    assert time.monotonic() - began < 120  # bounded by its deadline (plus a create and a destroy), not hung
    assert "not ready within 3s" in caught.value.message and "port 8000" in caught.value.message
    _nothing_left(alice, name)

    label = {"case": _name()}  # a plain create with a probe: the same, and the half-made sandbox is destroyed
    with pytest.raises(SandboxNotReady) as caught:
        alice.create("python", labels=label, ready={"command": ["sh", "-c", "echo not-yet; exit 1"], "timeout_s": 2})
    assert "not-yet" in caught.value.message
    assert not alice.list(label)


def test_start_command_that_dies_fails_at_once_with_its_output(alice):
    name = _name()
    began = time.monotonic()
    with pytest.raises(SandboxNotReady) as caught:
        alice.templates.create(name, image="python", start=["sh", "-c", "echo boom >&2; exit 3"],
                               ready={"tcp_port": 8000, "timeout_s": 600})
    assert time.monotonic() - began < 300  # well before the probe's 600 s deadline: the exit ended the wait
    assert "exit status 3" in caught.value.message and "boom" in caught.value.message
    _nothing_left(alice, name)


def test_plain_create_with_ready_waits_for_the_probe(alice):
    with alice.create("python", ready={"command": ["true"]}) as sandbox:
        assert "ready" in sandbox.info.timings_ms
        assert sandbox.info.spec.ready.command == ["true"]


def test_bad_input_is_typed_and_templates_are_per_tenant(alice, bob):
    with pytest.raises(InvalidSpec):
        alice.templates.create("Bad/Name", image="busybox", start=[], ready={"command": ["true"]})
    with pytest.raises(InvalidSpec):
        alice.templates.create(_name(), image="busybox", ready={"command": ["true"], "tcp_port": 80})
    with pytest.raises(InvalidSpec):
        alice.create("busybox", ready={})
    with pytest.raises(TemplateNotFound):
        alice.create(template="t-never-made")
    with pytest.raises(TemplateNotFound):
        alice.templates.delete("t-never-made")

    name = _name()
    alice.templates.create(name, image="busybox", start=[], ready={"command": ["true"]})
    try:
        with pytest.raises(TemplateExists):
            alice.templates.create(name, image="busybox", start=[], ready={"command": ["true"]})
        with pytest.raises(TemplateNotFound):
            bob.templates.get(name)  # another tenant's template is as good as absent
        with pytest.raises(TemplateNotFound):
            bob.create(template=name)
        assert name not in [t.name for t in bob.templates.list()]
    finally:
        alice.templates.delete(name)


def test_templates_survive_a_server_restart():
    first = serve(_config())
    name = _name()
    try:
        with dsec.Client(first.address, token=TOKENS["tpl-alice"]) as client:
            built = client.templates.create(name, image="python", start=START, ready={"tcp_port": 8000})
    finally:
        first.stop()
    second = serve(_config())
    try:
        with dsec.Client(second.address, token=TOKENS["tpl-alice"]) as client:
            assert client.templates.get(name) == built
            with client.create(template=name) as sandbox:
                assert sandbox.exec(GET).stdout == b"200\n"
            client.templates.delete(name)
            _nothing_left(client, name)
    finally:
        second.stop()
