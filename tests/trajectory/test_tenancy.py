"""Trajectories are tenant-scoped: with token auth, one tenant can neither read nor replay another's log."""

from __future__ import annotations

from pathlib import Path

import pytest

import dsec

from .conftest import DRIVER, ServerProcess

pytestmark = pytest.mark.timeout(300)
TOKENS = {"tok-alice-1234": "alice", "tok-bob-5678": "bob"}


@pytest.fixture
def server_args(tmp_path: Path) -> list[str]:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("".join(f"{token}: {tenant}\n" for token, tenant in TOKENS.items()))
    return ["--tokens-file", str(tokens)]


def test_tenants_do_not_share_trajectories(dsec_server: ServerProcess) -> None:
    with dsec.Client(dsec_server.address, token="tok-alice-1234") as alice, dsec.Client(
        dsec_server.address, token="tok-bob-5678"
    ) as bob:
        sandbox = alice.create("busybox", "container", driver=DRIVER, memory_mb=128, timeout_s=300)
        try:
            with dsec.trajectory("rollout/1", client=alice) as tr:
                sandbox.exec("echo secret")
                assert [s.step for s in tr.steps()] == [0]
                assert tr.sandbox_id == sandbox.id
            for name in ("rollout/1", "tenant:alice/rollout/1"):
                with dsec.trajectory(name, client=bob) as other:
                    assert other.steps() == [] and other.sandbox_id == ""
        finally:
            sandbox.destroy()
