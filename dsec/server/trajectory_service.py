"""The TrajectoryService servicer: read, fork, resume and garbage-collect the trajectory log over gRPC.

Steps themselves are written by SandboxService through the StepCoordinator; this service shares that
coordinator (`coordinator_for`) so re-running an indeterminate step or opting in to a rebuild cannot race a
live execution of the same step. Trajectory ids are tenant-scoped exactly as SandboxService scopes them.
"""

from __future__ import annotations

import grpc

from dsec import models, wire
from dsec.errors import InvalidSpec
from dsec.server.auth import DEFAULT_TENANT, Authenticator
from dsec.server.errors import rpc_errors
from dsec.trajectory.coordinator import coordinator_for
from dsec.trajectory.log import StepRecord, TrajectoryInfo, TrajectoryLog
from dsec.trajectory.records import StepState
from dsec.v1 import trajectory_pb2 as tpb
from dsec.v1 import trajectory_pb2_grpc as tpb_grpc

_TENANT_PREFIX = "tenant:"


def _scoped(tenant: str, trajectory_id: str) -> str:
    # Must match dsec.server.sandbox_service.tenant_trajectory_id, which names the steps it logs.
    return trajectory_id if tenant == DEFAULT_TENANT else f"{_TENANT_PREFIX}{tenant}/{trajectory_id}"


def _unscoped(tenant: str, trajectory_id: str) -> str:
    prefix = "" if tenant == DEFAULT_TENANT else f"{_TENANT_PREFIX}{tenant}/"
    return trajectory_id[len(prefix) :] if prefix and trajectory_id.startswith(prefix) else trajectory_id


class TrajectoryService(tpb_grpc.TrajectoryServiceServicer):
    def __init__(self, log: TrajectoryLog, auth: Authenticator | None = None) -> None:
        self.log = log
        self.steps = coordinator_for(log)
        self.auth = auth or Authenticator({})

    def _tenant(self, context: grpc.ServicerContext) -> str:
        return self.auth.tenant(context)

    def _id(self, context: grpc.ServicerContext, trajectory_id: str) -> str:
        if not trajectory_id:
            raise InvalidSpec("trajectory_id is required")
        return _scoped(self._tenant(context), trajectory_id)

    def _info(self, tenant: str, info: TrajectoryInfo) -> tpb.TrajectoryInfo:
        steps = self.log.steps(info.trajectory_id, with_results=False)
        return wire.to_pb(models.TrajectoryInfo(
            trajectory_id=_unscoped(tenant, info.trajectory_id),
            parent_id=_unscoped(tenant, info.parent_id),
            fork_step=info.fork_step,
            sandbox_id=info.sandbox_id,
            created_at=info.created_at,
            updated_at=info.updated_at,
            steps=len(steps),
            done_steps=sum(1 for s in steps if s.state is StepState.DONE),
            snapshots=[models.TrajectorySnapshot(after_step=step, snapshot_id=ref) for step, ref in info.snapshots],
        ))

    def _get(self, context: grpc.ServicerContext, trajectory_id: str) -> tpb.TrajectoryInfo:
        info = self.log.info(self._id(context, trajectory_id))
        if info is None:
            return tpb.TrajectoryInfo(trajectory_id=trajectory_id)  # never logged: an empty trajectory
        return self._info(self._tenant(context), info)

    @staticmethod
    def _step(tenant: str, record: StepRecord) -> tpb.LoggedStep:
        return wire.to_pb(models.LoggedStep(
            step=record.step,
            kind=record.kind,
            request_hash=record.request_hash,
            sandbox_id=record.sandbox_id,
            state=record.state.value,
            started_at=record.started_at,
            finished_at=record.finished_at,
            result=record.result or b"",
            stored_in=_unscoped(tenant, record.stored_in),
            error=record.error,
        ))

    @rpc_errors
    def Get(self, request: tpb.TrajectoryRef, context: grpc.ServicerContext) -> tpb.TrajectoryInfo:
        return self._get(context, request.trajectory_id)

    @rpc_errors
    def List(self, request: tpb.ListTrajectoriesRequest, context: grpc.ServicerContext) -> tpb.ListTrajectoriesResponse:
        tenant = self._tenant(context)
        scoped_prefix = _scoped(tenant, request.prefix)
        found = self.log.list(scoped_prefix)
        if tenant == DEFAULT_TENANT:
            found = [t for t in found if not t.trajectory_id.startswith(_TENANT_PREFIX)]
        return tpb.ListTrajectoriesResponse(trajectories=[self._info(tenant, t) for t in found])

    @rpc_errors
    def Steps(self, request: tpb.ListStepsRequest, context: grpc.ServicerContext) -> tpb.ListStepsResponse:
        tenant = self._tenant(context)
        records = self.log.steps(self._id(context, request.trajectory_id), with_results=request.with_results)
        return tpb.ListStepsResponse(steps=[self._step(tenant, r) for r in records])

    @rpc_errors
    def Fork(self, request: tpb.ForkTrajectoryRequest, context: grpc.ServicerContext) -> tpb.TrajectoryInfo:
        tenant = self._tenant(context)
        forked = self.log.fork(
            self._id(context, request.trajectory_id), request.at_step, self._id(context, request.new_trajectory_id)
        )
        return self._info(tenant, forked)

    @rpc_errors
    def Attach(self, request: tpb.AttachRequest, context: grpc.ServicerContext) -> tpb.TrajectoryInfo:
        if not request.sandbox_id:
            raise InvalidSpec(f"trajectory {request.trajectory_id!r}: attach needs a sandbox id")
        self.log.attach(self._id(context, request.trajectory_id), request.sandbox_id)
        return self._get(context, request.trajectory_id)

    @rpc_errors
    def RecordSnapshot(self, request: tpb.RecordSnapshotRequest, context: grpc.ServicerContext) -> tpb.TrajectoryInfo:
        self.log.record_snapshot(self._id(context, request.trajectory_id), request.after_step, request.snapshot_id)
        return self._get(context, request.trajectory_id)

    @rpc_errors
    def Rebuild(self, request: tpb.RebuildRequest, context: grpc.ServicerContext) -> tpb.RebuildResponse:
        count = self.steps.rebuild(
            self._id(context, request.trajectory_id), request.from_step, request.to_step, request.sandbox_id
        )
        return tpb.RebuildResponse(steps=count)

    @rpc_errors
    def RerunStep(self, request: tpb.StepRef, context: grpc.ServicerContext) -> tpb.RerunStepResponse:
        return tpb.RerunStepResponse(rerun=self.steps.rerun_step(self._id(context, request.trajectory_id), request.step))

    @rpc_errors
    def Delete(self, request: tpb.TrajectoryRef, context: grpc.ServicerContext) -> tpb.TrajectoryEmpty:
        self.log.delete(self._id(context, request.trajectory_id))
        return tpb.TrajectoryEmpty()

    @rpc_errors
    def Gc(self, request: tpb.GcRequest, context: grpc.ServicerContext) -> tpb.GcResponse:
        if self._tenant(context) != DEFAULT_TENANT:
            raise InvalidSpec("trajectory GC spans every tenant; run it with the operator's (default-tenant) access")
        if request.max_age_s <= 0:
            raise InvalidSpec(f"max_age_s must be > 0, got {request.max_age_s}")
        return tpb.GcResponse(deleted=self.log.gc(request.max_age_s))


def add_trajectory_service(server: grpc.Server, log: TrajectoryLog, auth: Authenticator | None = None) -> None:
    """Serve TrajectoryService on `server`. Pass the server's Authenticator so trajectory ids are tenant-scoped."""
    tpb_grpc.add_TrajectoryServiceServicer_to_server(TrajectoryService(log, auth), server)
