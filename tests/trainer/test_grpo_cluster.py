"""`--address`: the GRPO trainer joins an existing Ray cluster (`ray start --head` on loopback) instead of starting
its own, runs its learner and rollout-worker actors there, and the cluster is stopped afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"


def _kill_session(proc: subprocess.Popen, marker: str) -> None:
    """Stop the head we started: SIGTERM to `ray start --block` (it stops its daemons), then SIGKILL anything of
    that session still alive, found by the marker in its environment (Ray renames its daemons' cmdlines)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    needle = f"DSEC_TEST_RAY_HEAD={marker}\0".encode()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes() + b"\0"
        except OSError:
            continue
        if needle in environ:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def ray_head(ray_tmp):
    """A one-node Ray cluster on 127.0.0.1 with every port chosen free (other tests may run a Ray beside it)."""
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", DSEC_TEST_RAY_HEAD=str(ray_tmp))
    ports = {f"--{name}": str(free_port()) for name in (
        "object-manager-port", "node-manager-port", "ray-client-server-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")}
    cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
           "--temp-dir", str(ray_tmp), *[x for kv in ports.items() for x in kv]]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not list(ray_tmp.glob("session_*/logs/raylet.out")):
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "ray start --head did not come up in 120 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        _kill_session(proc, str(ray_tmp))


@pytest.mark.timeout(600)
def test_address_runs_the_trainer_on_an_existing_cluster(trainer_assets, dsec_server, ray_head, ray_tmp, tmp_path,
                                                         make_config):
    cfg = make_config(tmp_path / "run", steps=1, prompts_per_step=1, group_size=2)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    env.pop("DSEC_RAY_TMPDIR", None)  # the cluster owns its temp dir; the driver only connects
    cmd = [sys.executable, "-m", "trainer.grpo", str(cfg_path), "--tokenizer", str(trainer_assets["tokenizer"]),
           "--init", str(trainer_assets["sft"]), "--dsec-address", dsec_server.address, "--address", ray_head,
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=480)
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0, out[-4000:]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the rollouts ran in dsec sandboxes: none failed, and each ran tools or a verifier unless a budget cut it
    # (a cut rollout is rewarded 0 without its verifier since daa34b6; this tiny policy often is cut)
    assert [m["step"] for m in metrics] == [1] and metrics[0]["rollout_failures"] == 0
    assert metrics[0]["tools_live"] > 0 or metrics[0]["stop_length"] == 1.0
    assert (tmp_path / "run" / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"  # the CLI plots its rewards too
    # The actors ran in the cluster we started: its session (not a private one of the driver) holds their logs.
    worker_logs = "".join(p.read_text(errors="replace") for p in ray_tmp.glob("session_*/logs/worker-*"))
    assert "RolloutWorker" in worker_logs and "LearnerActor" in worker_logs
