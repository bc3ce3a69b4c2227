"""Cross-tenant ids on every substrate: another tenant's sandbox and snapshot ids, used with a token of one's own.

A server with a tokens file (two tenants) runs beside the suite's open one. Alice creates a sandbox of the case
and snapshots it; Bob, holding both ids, tries every call that takes them. Each must fail as not found (Bob must
not even learn the ids exist), and afterwards Alice's sandbox is untouched: its file unchanged, it still runs,
her snapshot still listed, and Bob owns nothing.
"""

from __future__ import annotations

import secrets

import pytest

import dsec
from dsec.config import ServerConfig
from dsec.errors import DsecError, SandboxNotFound, SnapshotNotFound
from dsec.server.main import serve
from dsec.v1 import sandbox_pb2 as pb

from .conftest import VM_MEMORY_MB, is_vm
from .table import CREATED, record

pytestmark = pytest.mark.timeout(300)

TOKENS = {"alice": "tok-alice-" + secrets.token_hex(8), "bob": "tok-bob-" + secrets.token_hex(8)}


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    tokens_file = tmp_path_factory.mktemp("tenancy") / "tokens.yaml"
    tokens_file.write_text("".join(f"{token}: {tenant}\n" for tenant, token in TOKENS.items()))
    running = serve(ServerConfig(listen="127.0.0.1:0", tokens_file=tokens_file))
    alice = dsec.Client(running.address, token=TOKENS["alice"])
    bob = dsec.Client(running.address, token=TOKENS["bob"])
    yield alice, bob
    alice.close()
    bob.close()
    running.stop()


def _attempt(name: str, call, expected: type[DsecError]) -> str:
    try:
        call()
    except expected:
        return ""
    except DsecError as error:
        return f"{name}: {type(error).__name__}"
    return f"{name}: SUCCEEDED"


def test_cross_tenant_sandbox_and_snapshot_ids(case, tenants):
    alice, bob = tenants
    _, substrate, driver, image = case
    sandbox = alice.create(image, substrate, driver=driver, timeout_s=600, memory_mb=VM_MEMORY_MB if is_vm(case) else 256)
    CREATED.append(sandbox.id)
    try:
        sandbox.files.write("/owned", b"alice")
        try:
            snapshot = sandbox.snapshot()
        except DsecError as error:  # a substrate without snapshots: the sandbox id routes are still tried
            snapshot, note = "", f"no snapshot ({type(error).__name__}); "
        else:
            note = ""
        foreign = dsec.Sandbox(bob, pb.SandboxInfo(id=sandbox.id))
        problems = [
            _attempt("connect", lambda: bob.connect(sandbox.id), SandboxNotFound),
            _attempt("exec", lambda: foreign.exec("echo pwned > /owned"), SandboxNotFound),
            _attempt("files.read", lambda: foreign.files.read("/owned"), SandboxNotFound),
            _attempt("files.write", lambda: foreign.files.write("/owned", b"bob"), SandboxNotFound),
            _attempt("snapshot", lambda: foreign.snapshot(), SandboxNotFound),
            _attempt("fork", lambda: foreign.fork(), SandboxNotFound),
            _attempt("destroy", lambda: bob.destroy(sandbox.id), SandboxNotFound),
        ]
        if snapshot:
            problems += [
                _attempt("restore", lambda: bob.restore(snapshot), SnapshotNotFound),
                _attempt("delete_snapshot", lambda: bob.delete_snapshot(snapshot), SnapshotNotFound),
            ]
            if snapshot in [ref.snapshot_id for ref in bob.snapshots()]:
                problems.append("bob's snapshot list shows it")
            if snapshot not in [ref.snapshot_id for ref in alice.snapshots()]:
                problems.append("alice's snapshot is gone")
        if sandbox.id in {s.id for s in bob.list()}:
            problems.append("bob's list shows it")
        if bob.list():
            problems.append(f"bob owns {len(bob.list())} sandboxes")
        if sandbox.files.read("/owned") != b"alice":
            problems.append("alice's file changed")
        if sandbox.exec("echo mine").text.strip() != "mine":
            problems.append("alice's sandbox stopped answering")
        problems = [p for p in problems if p]
        outcome = note + ("; ".join(problems) if problems else "every call answered not found; alice's sandbox untouched")
        assert record(case[0], "cross-tenant sandbox and snapshot ids", outcome, not problems)
    finally:
        try:
            sandbox.destroy()
        except DsecError:
            pass
        for ref in alice.snapshots():
            try:
                alice.delete_snapshot(ref.snapshot_id)
            except DsecError:
                pass
