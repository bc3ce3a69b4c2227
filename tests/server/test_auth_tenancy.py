"""Token auth and tenant isolation on a live server: a tenant can neither see nor touch another's sandboxes."""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

import pytest

import dsec
from dsec.config import ServerConfig
from dsec.errors import CapacityExceeded, SandboxNotFound, SnapshotNotFound, Unauthenticated
from dsec.server.main import serve
from dsec.v1 import sandbox_pb2

from .conftest import TOKENS

pytestmark = pytest.mark.timeout(300)


def test_calls_without_a_valid_token_are_rejected(secured_server):
    with pytest.raises(Unauthenticated):
        dsec.Client(secured_server.address).list()
    with pytest.raises(Unauthenticated):
        dsec.Client(secured_server.address, token="not-a-token").list()


def test_a_tenant_cannot_see_or_touch_another_tenants_sandbox(secured_server):
    alice = dsec.Client(secured_server.address, token=TOKENS["alice"])
    bob = dsec.Client(secured_server.address, token=TOKENS["bob"])
    with alice.create(image="busybox", substrate="container") as sandbox:
        assert sandbox.exec("echo hi").stdout == b"hi\n"
        assert sandbox.id in {s.id for s in alice.list()}
        assert sandbox.id not in {s.id for s in bob.list()}
        with pytest.raises(SandboxNotFound):
            bob.connect(sandbox.id)
        with pytest.raises(SandboxNotFound):
            dsec.Sandbox(bob, sandbox_pb2.SandboxInfo(id=sandbox.id)).exec("echo pwned")
        with pytest.raises(SandboxNotFound):
            bob.destroy(sandbox.id)
        snapshot = sandbox.snapshot()
        with pytest.raises(SnapshotNotFound):
            bob.restore(snapshot)
        assert snapshot not in [ref.snapshot_id for ref in bob.snapshots()]
        with pytest.raises(SnapshotNotFound):
            bob.delete_snapshot(snapshot)
        assert snapshot in [ref.snapshot_id for ref in alice.snapshots()]
        assert sandbox.exec("echo still-mine").ok


def test_per_tenant_quota_rejects_without_waiting(secured_server):
    alice = dsec.Client(secured_server.address, token=TOKENS["alice"])
    bob = dsec.Client(secured_server.address, token=TOKENS["bob"])
    held = [alice.create(image="busybox") for _ in range(2)]
    try:
        with pytest.raises(CapacityExceeded, match="quota"):
            alice.create(image="busybox")
        with bob.create(image="busybox") as other:  # bob's quota is his own
            assert other.exec("true").ok
    finally:
        for sandbox in held:
            sandbox.destroy()


def test_metrics_endpoint_reports_sandboxes_and_latencies(secured_server):
    alice = dsec.Client(secured_server.address, token=TOKENS["alice"])
    with alice.create(image="busybox") as sandbox:
        sandbox.exec("true")
        port = secured_server.metrics_http.server_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'dsec_sandboxes{state="running",substrate="container"}' in text
    assert "dsec_create_seconds_count" in text
    assert 'dsec_execs_total{outcome="ok",substrate="container"}' in text


def _make_certs(tmp: Path) -> dict[str, Path]:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=dsec-test-ca", "-keyout", "ca.key", "-out", "ca.crt")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (tmp / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
            "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    return {name: tmp / name for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def test_mutual_tls_requires_a_client_certificate(tmp_path):
    certs = _make_certs(tmp_path)
    running = serve(
        ServerConfig(
            home=tmp_path / "home",
            listen="localhost:0",
            tls_cert=certs["server.crt"],
            tls_key=certs["server.key"],
            tls_client_ca=certs["ca.crt"],
        )
    )
    try:
        good = dsec.Client(
            running.address, tls_ca=str(certs["ca.crt"]), tls_cert=str(certs["client.crt"]), tls_key=str(certs["client.key"])
        )
        assert good.list() == []
        with pytest.raises(dsec.DsecError):
            dsec.Client(running.address, tls_ca=str(certs["ca.crt"])).list()  # no client certificate
        with pytest.raises(dsec.DsecError):
            dsec.Client(running.address).list()  # plaintext against a TLS port
    finally:
        running.stop()
