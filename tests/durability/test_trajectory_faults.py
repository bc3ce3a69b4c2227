"""The trajectory log under disk faults: ENOSPC (a full loop-mounted ext4) and EIO (a fault-injecting FUSE layer, faultfs.py).

What must hold (issue #22, point 5): the append that hits the fault fails with a typed error (DiskFull for
ENOSPC, RuntimeFailure for EIO) and so does every later one on that log; every record acknowledged before the
fault is intact after the log is reopened from disk; the step whose append failed is not visible as done (its
half-written frame is cut off as a torn tail); once the disk is healthy again the reopened log appends again.
"""

from __future__ import annotations

import secrets

import pytest

from dsec.errors import DiskFull, DsecError, RuntimeFailure
from dsec.trajectory.filelog import FileLog
from dsec.trajectory.log import StepRef
from dsec.trajectory.records import StepState

pytestmark = pytest.mark.timeout(300)

TRAJECTORY = "t-disk-faults"
RESULT_BYTES = 48 << 10


def _append_until_error(log: FileLog, first_step: int, limit: int) -> tuple[dict[int, bytes], DsecError | None, int]:
    """Log steps (intent + result) until one fails; returns (acknowledged results, the error, the failed step)."""
    acked: dict[int, bytes] = {}
    for step in range(first_step, first_step + limit):
        result = secrets.token_bytes(RESULT_BYTES)
        try:
            log.begin(StepRef(TRAJECTORY, step, f"h{step}", "exec", "sb-fault"))
            log.complete(StepRef(TRAJECTORY, step, f"h{step}", "exec", "sb-fault"), result, 1.0, 2.0)
        except DsecError as error:
            return acked, error, step
        acked[step] = result
    return acked, None, -1


def _check_reopened(directory, acked: dict[int, bytes], failed_step: int) -> FileLog:
    log = FileLog(directory)
    for step, result in acked.items():
        record = log.lookup(TRAJECTORY, step)
        assert record is not None and record.state is StepState.DONE, f"acknowledged step {step} lost"
        assert record.result == result, f"acknowledged step {step} came back different"
    failed = log.lookup(TRAJECTORY, failed_step)
    assert failed is None or failed.state is not StepState.DONE, "the step whose append failed is visible as done"
    return log


def test_enospc_during_append(small_disk):
    directory = small_disk.mount / "log"
    log = FileLog(directory)
    try:
        filler = small_disk.fill(leave_bytes=2 << 20)  # ~40 steps of room left
        acked, error, failed_step = _append_until_error(log, 0, 1000)
        assert isinstance(error, DiskFull), f"expected DiskFull, got {type(error).__name__}: {error}"
        assert len(acked) > 0
        with pytest.raises(DiskFull):  # the log refuses every later append: its file's tail is unknown
            log.begin(StepRef(TRAJECTORY, failed_step + 1, "h", "exec", "sb-fault"))
    finally:
        log.close()
    filler.unlink()  # space again
    reopened = _check_reopened(directory, acked, failed_step)
    try:
        more, error, _ = _append_until_error(reopened, failed_step + 1, 3)
        assert error is None and len(more) == 3, f"the healed log does not append: {error}"
    finally:
        reopened.close()


def test_eio_during_append(fault_fs):
    directory = fault_fs.mount / "log"
    log = FileLog(directory)
    try:
        acked, error, _ = _append_until_error(log, 0, 20)
        assert error is None and len(acked) == 20
        fault_fs.fail_io()
        more, error, failed_step = _append_until_error(log, 20, 50)
        assert not more, "an append was acknowledged after the disk failed"
        assert isinstance(error, RuntimeFailure) and not isinstance(error, DiskFull), f"got {type(error).__name__}: {error}"
        assert "Input/output error" in str(error), str(error)
        with pytest.raises(RuntimeFailure):  # and every later one: the segment's tail is unknown
            log.begin(StepRef(TRAJECTORY, failed_step + 1, "h", "exec", "sb-fault"))
    finally:
        log.close()
    fault_fs.heal()
    reopened = _check_reopened(directory, acked, failed_step)
    try:
        more, error, _ = _append_until_error(reopened, failed_step + 1, 3)
        assert error is None and len(more) == 3, f"the healed log does not append: {error}"
    finally:
        reopened.close()
