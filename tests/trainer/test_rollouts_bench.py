"""`python -m bench.rollouts --quick` end to end: the real stages (tokenizer, SFT), sync and async GRPO on Ray
with container sandboxes, a concurrent batch through a warm pool and the held-out comparison, in one process.

The quick SFT solves nothing, so this checks the bench's plumbing and its last line, not its numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KEYS = ["async_over_sync_throughput", "async_over_sync_range", "max_staleness", "async_cpu_ceiling",
        "sync_learner_busy", "sync_rollout_wait", "sync_cpu_busy", "async_learner_busy", "async_rollout_wait",
        "async_cpu_busy", "rollouts_per_s", "rollouts_per_s_range", "sandbox_wait_fraction", "sandbox_wait_range",
        "sampler_speedup", "tito_violations", "heldout_sft", "heldout_sync", "heldout_async",
        "heldout_async_minus_sync", "heldout_diff_ci95"]


def test_quick_bench_prints_every_key() -> None:
    # the timeout only bounds a hang: the run ends on its own (about 2 minutes on a quiet machine)
    done = subprocess.run([sys.executable, "-m", "bench.rollouts", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    fields = dict(item.split("=", 1) for item in last.split())
    assert list(fields) == KEYS, last
    assert fields["tito_violations"] == "0"
    assert fields["max_staleness"] == "1"
    assert float(fields["async_over_sync_throughput"]) > 0
    assert float(fields["rollouts_per_s"]) > 0
    assert float(fields["sampler_speedup"]) > 0
    for name in ("sync", "async"):
        for share in ("learner_busy", "rollout_wait"):
            assert 0 <= float(fields[f"{name}_{share}"]) <= 1, last
        assert 0 < float(fields[f"{name}_cpu_busy"]) <= 1.05, last  # /proc/stat counts in 10 ms ticks
    assert float(fields["async_cpu_ceiling"]) >= 0.95, last  # 1 / sync_cpu_busy
    for name in ("heldout_sft", "heldout_sync", "heldout_async"):
        mean, bounds = fields[name].rstrip("]").split("[")
        low, high = (float(b) for b in bounds.split(","))
        assert 0 <= low <= float(mean) <= high <= 1, last
    diff = float(fields["heldout_async_minus_sync"])
    low, high = (float(b) for b in fields["heldout_diff_ci95"].strip("[]").split(","))
    assert low <= diff <= high, last
