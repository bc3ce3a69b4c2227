"""One atomic, self-describing checkpoint: a kill -9 in the middle of writing it leaves the previous one whole,
and a resume refuses a checkpoint whose step (or run) disagrees with the run state, naming both."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainer import checkpoint
from trainer.checkpoint import CheckpointError, CheckpointMismatch, Manifest

REPO = Path(__file__).resolve().parents[2]


def _manifest(step: int, run_id: str = "r", cursor: int | None = None) -> Manifest:
    return Manifest(run_id=run_id, step=step, cursor=100 + 4 * step if cursor is None else cursor,
                    contents=list(checkpoint.CONTENTS))


def _payload(value: float) -> dict:
    return {"model": {"w": torch.full((4,), value)}, "ref": {}, "opt": {}, "torch_rng": torch.get_rng_state(),
            "sandboxes": ["sb-1"]}


def test_round_trip_carries_its_manifest(tmp_path):
    path = tmp_path / "learner.pt"
    checkpoint.save(path, _manifest(3), _payload(3.0))
    manifest, data = checkpoint.load(path)
    assert manifest == _manifest(3) and manifest.format == checkpoint.FORMAT
    assert torch.equal(data["model"]["w"], torch.full((4,), 3.0)) and data["sandboxes"] == ["sb-1"]
    assert [p.name for p in tmp_path.iterdir()] == ["learner.pt"]  # no temporary file left behind


def test_a_payload_missing_what_the_manifest_names_is_not_written(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        checkpoint.save(tmp_path / "learner.pt", _manifest(1), {"model": {}})
    assert not (tmp_path / "learner.pt").exists()


def test_a_file_that_is_not_a_checkpoint_is_a_typed_error(tmp_path):
    (tmp_path / "learner.pt").write_bytes(b"half a file")
    with pytest.raises(CheckpointError, match="is not a trainer checkpoint"):
        checkpoint.load(tmp_path / "learner.pt")
    torch.save({"model": {}}, tmp_path / "sft.pt")  # a bare state_dict file: no manifest
    with pytest.raises(CheckpointError, match="is not a trainer checkpoint"):
        checkpoint.load(tmp_path / "sft.pt")


_WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from trainer import checkpoint

    class Stall:
        # pickled in the middle of the payload: says so, then waits for the kill
        def __reduce__(self):
            sys.stdout.write("writing\\n"); sys.stdout.flush()
            sys.stdin.readline()
            return (int, (0,))

    manifest = checkpoint.Manifest(run_id="r", step=2, cursor=108, contents=list(checkpoint.CONTENTS))
    payload = {"model": {"w": torch.full((1 << 20,), 2.0)}, "ref": {}, "opt": {"stall": Stall()},
               "torch_rng": torch.get_rng_state(), "sandboxes": []}
    checkpoint.save(Path(sys.argv[1]), manifest, payload)
""")


def test_kill9_while_writing_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "learner.pt"
    checkpoint.save(path, _manifest(1), _payload(1.0))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert proc.stdout.readline() == b"writing\n"  # the new checkpoint is half written: kill it there
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    manifest, data = checkpoint.load(path)
    assert manifest.step == 1 and torch.equal(data["model"]["w"], torch.full((4,), 1.0))


def _state(step: int, run_id: str = "r", inflight: bool = False) -> dict:
    return {"run_id": run_id, "step": step, "cursor": 100 + 4 * step, "inflight": ["t"] if inflight else []}


S, C = Path("out/state.json"), Path("out/learner.pt")


def test_resume_pairs_the_checkpoint_with_the_run_state():
    assert checkpoint.reconcile(None, None, S, C) == (None, False)  # nothing to resume: a fresh run
    assert checkpoint.reconcile(_state(0, inflight=True), None, S, C) == (_state(0, inflight=True), False)
    # killed before the commit: the step in flight is re-run from the checkpoint of the step before
    assert checkpoint.reconcile(_state(2, inflight=True), _manifest(2), S, C) == (_state(2, inflight=True), False)
    # killed after the commit, before the run state said so: the step is done, its sandboxes still to destroy
    assert checkpoint.reconcile(_state(2, inflight=True), _manifest(3), S, C) == (_state(3), True)


@pytest.mark.parametrize("state, manifest, says", [
    (_state(2), _manifest(3), "is at step 3 (cursor 112) but the run state out/state.json is at step 2"),
    (_state(3, inflight=True), _manifest(1), "is at step 1 (cursor 104) but the run state out/state.json is at step 3"),
    (_state(3, inflight=True), _manifest(5), "is at step 5"),
    (_state(2), _manifest(2, cursor=7), "cursor 7"),
    (_state(2, run_id="new"), _manifest(2, run_id="old"), "belongs to run 'old' (step 2) but the run state"),
    (_state(2), None, "is at step 2 but there is no checkpoint out/learner.pt"),
    (None, _manifest(2), "checkpoint out/learner.pt is at step 2 but there is no run state out/state.json"),
])
def test_resume_refuses_a_checkpoint_of_another_step_naming_both(state, manifest, says):
    with pytest.raises(CheckpointMismatch) as err:
        checkpoint.reconcile(state, manifest, S, C)
    assert says in str(err.value)


def test_the_trainer_refuses_to_resume_from_a_mismatched_checkpoint(tmp_path, trainer_assets, make_config):
    """Through `train_grpo` itself: the refusal comes before Ray or any sandbox is started."""
    from trainer.grpo import train_grpo

    cfg = make_config(tmp_path)
    checkpoint.write_json(tmp_path / "state.json", _state(1, inflight=True))
    checkpoint.save(tmp_path / "learner.pt", _manifest(4), _payload(4.0))
    with pytest.raises(CheckpointMismatch, match=r"learner.pt is at step 4 .*/state.json is at step 1"):
        train_grpo(cfg, trainer_assets["tokenizer"], None, address=None, dsec_address="127.0.0.1:1", resume=True)
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 1  # nothing was changed
