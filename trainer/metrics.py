"""Metrics as JSONL (the record) and TensorBoard (the view), plus the reward-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per step to `metrics.jsonl` and mirrors scalars to TensorBoard.

    `keep_through_step`: records of later steps are dropped first. A step's record is written before its
    checkpoint, so a run resumed from step N re-writes steps after N once each (TensorBoard, append-only, shows
    a re-run step twice)."""

    def __init__(self, out_dir: Path, keep_through_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(out_dir) / "metrics.jsonl"
        if keep_through_step is not None and self.path.exists():
            kept = [m for m in read_metrics(out_dir) if int(m.get("step", 0)) <= keep_through_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
            tmp.replace(self.path)
        self.tb = SummaryWriter(str(Path(out_dir) / "tb"))

    def write(self, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        step = int(metrics.get("step", 0))
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def read_metrics(out_dir: Path) -> list[dict[str, float]]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_rewards(out_dir: Path, png: Path) -> None:
    """Mean train reward per GRPO step (the last record per step counts: a resumed step overwrites).

    Drawn on a bare `Figure`, not pyplot: the OPD recipe trains two runs in threads of one process, and pyplot's
    global figure state is not thread-safe."""
    from matplotlib.figure import Figure

    by_step = {int(m["step"]): m["reward_mean"] for m in read_metrics(out_dir)}
    steps = sorted(by_step)
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    ax.plot(steps, [by_step[s] for s in steps], marker="o")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
