"""One self-describing checkpoint per run, written atomically, and the rule that decides what a resume may do.

Why one file: the policy, the frozen reference, the optimizer, the RNG state, the step and the data cursor must
move together. Written as separate files, a kill -9 between two writes leaves (say) a step's weights beside the
previous step's cursor, and a resume silently trains that step twice. Here everything is one `torch.save` to a
temporary name, fsynced, renamed over the previous checkpoint and the directory fsynced: a kill at any instant
leaves either the old checkpoint or the new one. The manifest inside names the run, the step, the cursor and the
contents, so a checkpoint says what it is without the run's other files.

The run state (`state.json`, written before each step's rollouts) records the step in flight and its trajectory
ids. A resume accepts exactly two pairings: checkpoint step == run-state step (the step in flight is re-run; its
tool calls are answered from the trajectory log), or checkpoint step == run-state step + 1 with a step in flight
(it was committed just before the kill; only its sandbox clean-up is left). Anything else is refused with
`CheckpointMismatch` naming both, rather than guessed at.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

FORMAT = "dsec-trainer-checkpoint/1"
# What every checkpoint holds besides its manifest. The rollout RNG needs no entry: each rollout's generator is
# derived from (seed, trajectory id), so re-running a step samples the same tokens without saved state.
CONTENTS = ("model", "ref", "opt", "torch_rng", "sandboxes")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint's step (or run) disagrees with the run state: resuming would train from the wrong weights."""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    run_id: str
    step: int  # GRPO steps whose update these weights include
    cursor: int  # index of the next train problem the run draws
    contents: list[str]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(path: Path, write: Any) -> None:
    """`write(file)` into a fresh temporary name beside `path`, fsync, rename over `path`, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_json(path: Path, data: dict) -> None:
    """A small JSON file replaced atomically and durably (the run state)."""
    _replace_durably(Path(path), lambda f: f.write(json.dumps(data).encode()))


def save(path: Path, manifest: Manifest, payload: dict[str, Any]) -> None:
    missing = set(manifest.contents) - set(payload)
    if missing:
        raise ValueError(f"checkpoint payload lacks {sorted(missing)} named in its manifest")
    _replace_durably(Path(path), lambda f: torch.save({"manifest": manifest.model_dump(), **payload}, f))


def load(path: Path) -> tuple[Manifest, dict[str, Any]]:
    """The manifest and the payload; a file that is not a complete checkpoint raises `CheckpointError`."""
    try:
        data = torch.load(path, weights_only=False, map_location="cpu")
        manifest = Manifest.model_validate(data["manifest"])
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch/pickle/pydantic each raise their own
        raise CheckpointError(f"{path} is not a trainer checkpoint ({type(exc).__name__}: {exc}); start the run "
                              "again without --resume") from exc
    if manifest.format != FORMAT:
        raise CheckpointError(f"{path} has format {manifest.format!r}; this trainer reads {FORMAT!r}")
    missing = set(manifest.contents) - set(data)
    if missing:
        raise CheckpointError(f"{path} lacks {sorted(missing)} that its manifest names")
    return manifest, data


def reconcile(run_state: dict | None, manifest: Manifest | None, state_path: Path, ckpt_path: Path
              ) -> tuple[dict | None, bool]:
    """The run state to resume from (None: there is nothing to resume), and whether the checkpoint's step was
    committed after the run state was written (so its sandboxes still need destroying). Raises
    `CheckpointMismatch` on any other pairing."""
    if run_state is None:
        if manifest is None:
            return None, False
        raise CheckpointMismatch(f"checkpoint {ckpt_path} is at step {manifest.step} but there is no run state "
                                 f"{state_path}: restore it, or start the run again without --resume")
    step, run_id = run_state["step"], run_state["run_id"]
    if manifest is None:
        if step == 0:
            return run_state, False
        raise CheckpointMismatch(f"the run state {state_path} is at step {step} but there is no checkpoint "
                                 f"{ckpt_path}: restore it, or start the run again without --resume")
    if manifest.run_id != run_id:
        raise CheckpointMismatch(f"checkpoint {ckpt_path} belongs to run {manifest.run_id!r} (step {manifest.step}) "
                                 f"but the run state {state_path} is run {run_id!r} (step {step})")
    if manifest.step == step and manifest.cursor == run_state["cursor"]:
        return run_state, False
    if manifest.step == step + 1 and run_state.get("inflight"):
        return {**run_state, "step": manifest.step, "cursor": manifest.cursor, "inflight": []}, True
    raise CheckpointMismatch(f"checkpoint {ckpt_path} is at step {manifest.step} (cursor {manifest.cursor}) but the "
                             f"run state {state_path} is at step {step} (cursor {run_state['cursor']}"
                             f"{', a step in flight' if run_state.get('inflight') else ''}): refusing to resume from "
                             "weights of another step")
