"""`dsec.trajectory(...)`: number every tool call of a rollout so the server logs it exactly once.

    with dsec.trajectory("run-7/prompt-42/sample-3") as tr:
        sb = tr.sandbox(lambda: dsec.Sandbox.create(image="busybox"))
        sb.exec("echo step-0 >> /tmp/log")          # step 0
        sb.files.write("/tmp/x", "hi")              # step 1

Every mutating SDK call made inside the block (exec, session run, files.write, upload, call) asks
`steps.next_step_key` for the next step number. Re-running the same script with the same id after a crash starts
at step 0 again: each call gets its logged result back without executing, until the log runs out and calls
run live again — the rollout is fast-forwarded to where it died, and nothing runs twice.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dsec import wire
from dsec.errors import SandboxNotFound, SandboxStateError, SnapshotNotFound
from dsec.models import LoggedStep, TrajectoryInfo
from dsec.sdk import steps
from dsec.sdk.client import Client, default_client
from dsec.step_export import export_jsonl, export_parquet
from dsec.v1 import sandbox_pb2 as pb
from dsec.v1 import trajectory_pb2 as tpb
from dsec.v1 import trajectory_pb2_grpc as tpb_grpc

if TYPE_CHECKING:
    from dsec.sdk.sandbox import Sandbox

def current_trajectory() -> Trajectory | None:
    """The trajectory the calling context is in, if any."""
    current = steps.current.get()
    return current if isinstance(current, Trajectory) else None


class Trajectory:
    """One rollout's view of its log. Use as a context manager; numbering is per Trajectory object."""

    def __init__(self, trajectory_id: str, client: Client | None = None, start_step: int = 0) -> None:
        self.id = trajectory_id
        self._client = client or default_client()
        self._stub = tpb_grpc.TrajectoryServiceStub(self._client.channel)
        self._lock = threading.Lock()
        self._next = start_step
        self._tokens: list[contextvars.Token] = []
        self.restored = ""  # how `sandbox()` got its sandbox: new | live | snapshot | snapshot+rebuilt | rebuilt
        self.rebuilt_steps = 0  # logged steps that will re-execute in a rebuilt sandbox (explicit opt-in)

    # -- numbering --------------------------------------------------------------------------------------
    def _take_step(self, kind: str) -> pb.StepKey:
        with self._lock:
            step = self._next
            self._next += 1
        return pb.StepKey(trajectory_id=self.id, step=step)

    @property
    def next_step(self) -> int:
        """The number the next mutating call will get."""
        return self._next

    def resume(self) -> Trajectory:
        """Number from step 0 again: calls replay their logged results until the log runs out, then run live."""
        with self._lock:
            self._next = 0
        return self

    def __enter__(self) -> Trajectory:
        self._tokens.append(steps.current.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        steps.current.reset(self._tokens.pop())

    # -- the log ----------------------------------------------------------------------------------------
    def info(self) -> TrajectoryInfo:
        """Metadata (sandbox id, fork parent, snapshots, step counts); empty for a trajectory never logged."""
        return wire.from_pb_as(TrajectoryInfo, self._client.rpc(self._stub.Get, tpb.TrajectoryRef(trajectory_id=self.id)))

    @property
    def sandbox_id(self) -> str:
        """The sandbox this trajectory last ran in ("" if none was recorded)."""
        return self.info().sandbox_id

    def steps(self, with_results: bool = True) -> list[LoggedStep]:
        """Every logged step, a fork's shared prefix included, ordered by step."""
        request = tpb.ListStepsRequest(trajectory_id=self.id, with_results=with_results)
        return [wire.from_pb_as(LoggedStep, step) for step in self._client.rpc(self._stub.Steps, request).steps]

    def fork(self, at_step: int, new_id: str, sandbox: Sandbox | None = None) -> Trajectory:
        """A new trajectory sharing this one's steps [0, at_step); it numbers on from `at_step`.

        Give the fork its own sandbox (e.g. from `sb.fork()`), or its calls would mutate this one's.
        """
        request = tpb.ForkTrajectoryRequest(trajectory_id=self.id, at_step=at_step, new_trajectory_id=new_id)
        self._client.rpc(self._stub.Fork, request)
        forked = Trajectory(new_id, self._client, start_step=at_step)
        if sandbox is not None:
            forked.attach(sandbox)
        return forked

    def attach(self, sandbox: Sandbox) -> None:
        """Record that this trajectory runs in `sandbox`, so a resumed rollout re-attaches to it by id."""
        self._client.rpc(self._stub.Attach, tpb.AttachRequest(trajectory_id=self.id, sandbox_id=sandbox.id))

    def snapshot(self, sandbox: Sandbox, name: str = "") -> str:
        """Snapshot `sandbox` now and record it as the state after the last step issued (what resume restores)."""
        snapshot_id = sandbox.snapshot(name)
        request = tpb.RecordSnapshotRequest(trajectory_id=self.id, after_step=self._next - 1, snapshot_id=snapshot_id)
        self._client.rpc(self._stub.RecordSnapshot, request)
        return snapshot_id

    def rerun_step(self, step: int) -> bool:
        """Opt in to running an indeterminate step (started, result never logged) again; False if it is not one."""
        return self._client.rpc(self._stub.RerunStep, tpb.StepRef(trajectory_id=self.id, step=step)).rerun

    def delete(self) -> None:
        self._client.rpc(self._stub.Delete, tpb.TrajectoryRef(trajectory_id=self.id))

    # -- the sandbox ------------------------------------------------------------------------------------
    def sandbox(self, create: Callable[[], Sandbox], *, rebuild: bool = False) -> Sandbox:
        """The sandbox to run in: the live one by id, else the latest snapshot restored, else a new one.

        A restored snapshot older than the last logged step, or no snapshot at all, misses the effects of the
        later steps; then `rebuild=True` is required, and those steps re-execute in the new sandbox as the
        rollout re-issues them (their callers still get the logged results). A step that was running when
        the old sandbox's server died runs again too: its effect was lost with that sandbox. `self.restored` says which
        path was taken and `self.rebuilt_steps` how many steps will re-execute.
        """
        info = self.info()
        if info.sandbox_id:
            try:
                live = self._client.connect(info.sandbox_id)
            except (SandboxNotFound, SandboxStateError):  # never known here, or destroyed
                pass
            else:
                if live.info.state not in ("lost", "destroyed"):  # lost: its cluster node is gone
                    self.restored = "live"
                    return live
        logged = self.steps(with_results=False)
        end = max(s.step for s in logged) + 1 if logged else 0
        if end == 0:
            fresh = create()
            self.attach(fresh)
            self.restored, self.rebuilt_steps = "new", 0
            return fresh
        restored, from_step = self._restore_latest(info)
        if from_step < end and not rebuild:
            if restored is not None:
                restored.destroy()
            covered = f"its latest snapshot covers steps < {from_step}" if from_step else "it has no snapshot"
            raise SandboxNotFound(
                f"sandbox {info.sandbox_id or '(none recorded)'} of trajectory {self.id!r} is gone and {covered}; "
                f"pass rebuild=True to re-execute logged steps {from_step}..{end - 1} in a new sandbox, "
                "or fork the trajectory",
                trajectory_id=self.id,
                sandbox_id=info.sandbox_id,
            )
        sandbox = restored if restored is not None else create()
        self.attach(sandbox)
        for unknown in (s for s in logged if s.state == "intent" and s.step >= from_step):
            # Started in the lost sandbox, result never logged: whatever it did died with that sandbox, so
            # running it in the new one is its first run there, not a second one.
            self.rerun_step(unknown.step)
        self.rebuilt_steps = 0
        if from_step < end:
            request = tpb.RebuildRequest(trajectory_id=self.id, from_step=from_step, to_step=end, sandbox_id=sandbox.id)
            self.rebuilt_steps = self._client.rpc(self._stub.Rebuild, request).steps
        if restored is None:
            self.restored = "rebuilt"  # a new sandbox in place of the lost one
        else:
            self.restored = "snapshot+rebuilt" if self.rebuilt_steps else "snapshot"
        return sandbox

    def _restore_latest(self, info: TrajectoryInfo) -> tuple[Sandbox | None, int]:
        """Restore the newest restorable snapshot; returns it and the first step whose effect it lacks."""
        for snapshot in sorted(info.snapshots, key=lambda s: s.after_step, reverse=True):
            try:
                return self._client.restore(snapshot.snapshot_id), snapshot.after_step + 1
            except SnapshotNotFound:
                continue
        return None, 0


def export(trajectory_ids: list[str], path: str | Path, *, client: Client | None = None) -> int:
    """Export trajectories from the server as training data: `.parquet` → Parquet, anything else → JSONL."""
    client = client or default_client()

    def steps_of(trajectory_id: str) -> list[LoggedStep]:
        return Trajectory(trajectory_id, client).steps(with_results=True)

    path = Path(path)
    writer = export_parquet if path.suffix == ".parquet" else export_jsonl
    return writer(steps_of, trajectory_ids, path)


def trajectory(trajectory_id: str, *, client: Client | None = None) -> Trajectory:
    """Log every mutating call made inside the `with` block as the next step of `trajectory_id`."""
    return Trajectory(trajectory_id, client)
