"""SandboxFusion's API through the door in front of the Ray cluster gateway: the real `sandbox-fusion` client
runs code on a 3-node cluster through one address, and a trajectory step is logged once for the whole cluster.

Why a shared log: each call gets a fresh sandbox, placed on any node, so a repeated step usually runs on another
node than the first; the nodes share one trajectory log (PostgreSQL, as docs/cluster.md deploys them), which is
what makes the repeat a replay.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray", reason="ray is installed by infra/setup.d (trainer extras)")

import sandbox_fusion as sf  # noqa: E402

from cluster.test_ray_cluster import ray_cluster  # noqa: E402,F401 - the multi-node Ray fixture
from dsec.cluster.ray_deploy import deploy  # noqa: E402
from support.postgres import throwaway_postgres  # noqa: E402

from .test_fusion import DsecRunCodeRequest  # noqa: E402

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def door(ray_cluster) -> Iterator:  # noqa: F811
    with throwaway_postgres("dsec-fusion-pg-") as dsn:
        deployed = deploy(os.environ["DSEC_HOME"], probe_interval_s=0.5, http_listen="127.0.0.1:0",
                          server_env={"DSEC_TRAJECTORY_DSN": dsn})
        try:
            yield deployed
        finally:
            deployed.stop()


def test_run_code_through_the_gateway_door(door):
    url = door.http_url
    assert url
    results = sf.run_concurrent(
        sf.run_code,
        args=[[DsecRunCodeRequest(code=f"print({i} * {i})", language="python"), url] for i in range(6)],
        kwargs=[{"max_attempts": 1}] * 6,
        concurrency=6,
    )
    assert [r.run_result.stdout for r in results] == [f"{i * i}\n" for i in range(6)]


def test_a_trajectory_step_replays_on_any_node(door):
    trajectory_id = f"gw-fusion-{uuid.uuid4().hex[:8]}"
    code = "import time; print(time.time_ns())"
    outputs = set()
    for _ in range(4):  # each in a fresh sandbox, placed by free capacity (with node-local logs this test fails)
        request = DsecRunCodeRequest(code=code, language="python", trajectory_id=trajectory_id, step=0)
        result = sf.run_code(request, door.http_url, max_attempts=1)
        assert result.status == sf.RunStatus.Success
        outputs.add(result.run_result.stdout)
    assert len(outputs) == 1, "every repeat returned the logged result: the step ran once"
