"""End to end through the real server and SDK: step numbering, replay, divergence, forks, re-attach,
rebuild on explicit opt-in, and a client whose exec is still running when it dies."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import dsec
from dsec.errors import SandboxNotFound, TrajectoryDiverged

from .conftest import DRIVER, ServerProcess

pytestmark = pytest.mark.timeout(300)
ROLLOUT = Path(__file__).with_name("rollout.py")


@pytest.fixture
def client(dsec_server: ServerProcess):
    with dsec.Client(dsec_server.address) as connected:
        yield connected


def _create(client: dsec.Client):
    return lambda: client.create("busybox", "container", driver=DRIVER, memory_mb=128, timeout_s=600)


def test_replay_divergence_and_reattach(client: dsec.Client, dsec_server: ServerProcess) -> None:
    tid = f"e2e/{uuid.uuid4().hex[:8]}"
    with dsec.trajectory(tid, client=client) as tr:
        sb = tr.sandbox(_create(client))
        assert tr.restored == "new" and tr.sandbox_id == sb.id
        first = sb.exec("echo x >> /tmp/f; wc -l < /tmp/f")
        assert sb.files.write("/tmp/g", "hello") == 5
        assert (first.text.strip(), first.replayed) == ("1", False)
    assert dsec_server.executed("exec") == 1
    with dsec.trajectory(tid, client=client) as tr:  # a re-run of the same rollout: fast-forwarded
        sb = tr.sandbox(_create(client))
        assert tr.restored == "live"
        again = sb.exec("echo x >> /tmp/f; wc -l < /tmp/f")
        assert (again.text.strip(), again.replayed) == ("1", True)
        assert sb.files.write("/tmp/g", "hello") == 5
        live = sb.exec("cat /tmp/f | wc -l")  # step 2: past the log, runs live
        assert (live.text.strip(), live.replayed) == ("1", False)  # the replayed step did not append again
        assert [(s.step, s.kind, s.state) for s in tr.steps(with_results=False)] == [
            (0, "exec", "done"), (1, "write_file", "done"), (2, "exec", "done"),
        ]
        tr.resume()
        with pytest.raises(TrajectoryDiverged, match="step 0"):
            sb.exec("echo something else")
    assert dsec_server.executed("exec") == 2
    outside = sb.exec("wc -l < /tmp/f")  # outside a trajectory nothing is logged
    assert outside.text.strip() == "1" and not outside.replayed


def test_fork_shares_the_prefix(client: dsec.Client) -> None:
    tid = f"e2e/{uuid.uuid4().hex[:8]}"
    with dsec.trajectory(tid, client=client) as tr:
        sb = tr.sandbox(_create(client))
        for word in ("a", "b"):
            sb.exec(f"echo {word}")
        sample = tr.fork(2, tid + "/sample-1")
    assert sample.next_step == 2
    with sample:
        sample.attach(sb)
        assert sb.exec("echo c").text.strip() == "c"
    assert [(s.step, s.stored_in) for s in sample.steps(with_results=False)] == [
        (0, tid), (1, tid), (2, tid + "/sample-1"),
    ]
    assert len(tr.steps()) == 2  # the parent is unchanged


def test_lost_sandbox_is_rebuilt_only_on_opt_in(client: dsec.Client, dsec_server: ServerProcess) -> None:
    tid = f"e2e/{uuid.uuid4().hex[:8]}"
    with dsec.trajectory(tid, client=client) as tr:
        sb = tr.sandbox(_create(client))
        for step in range(3):
            sb.exec(f"echo {step} >> /tmp/steps")
    sb.destroy()
    with dsec.trajectory(tid, client=client) as tr:
        with pytest.raises(SandboxNotFound, match="rebuild=True"):
            tr.sandbox(_create(client))
        rebuilt = tr.sandbox(_create(client), rebuild=True)
        assert (tr.restored, tr.rebuilt_steps) == ("rebuilt", 3)
        for step in range(3):
            assert rebuilt.exec(f"echo {step} >> /tmp/steps").replayed
        assert rebuilt.exec("cat /tmp/steps").text.split() == ["0", "1", "2"]
    # 3 live and the final cat; the 3 rebuilt steps re-ran (the file proves it) but answered from the log
    assert dsec_server.executed("exec") == 4
    rebuilt.destroy()


def test_retry_waits_for_the_exec_its_dead_client_started(client: dsec.Client, dsec_server: ServerProcess) -> None:
    tid = f"e2e/{uuid.uuid4().hex[:8]}"
    sb = _create(client)()
    code = (
        "import dsec, sys\n"
        f"c = dsec.Client({dsec_server.address!r})\n"
        f"sb = c.connect({sb.id!r})\n"
        f"with dsec.trajectory({tid!r}, client=c):\n"
        "    sb.exec('sleep 3; echo done >> /tmp/slow; cat /tmp/slow')\n"
    )
    victim = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 120
        with dsec.trajectory(tid, client=client) as tr:
            while not tr.steps(with_results=False) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert tr.steps(with_results=False)[0].state == "intent"  # it is running
        victim.kill()
        victim.wait(30)
        with dsec.trajectory(tid, client=client):
            result = sb.exec("sleep 3; echo done >> /tmp/slow; cat /tmp/slow")
        assert result.replayed and result.text.split() == ["done"]
        assert sb.exec("cat /tmp/slow").text.split() == ["done"]  # it ran exactly once
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(30)
        sb.destroy()


def test_resume_restores_the_latest_snapshot_and_exports(client: dsec.Client, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from dsec.sdk.trajectory import export

    tid = f"e2e/{uuid.uuid4().hex[:8]}"
    with dsec.trajectory(tid, client=client) as tr:
        sb = tr.sandbox(_create(client))
        for step in range(2):
            sb.exec(f"echo {step} >> /tmp/steps")
        tr.snapshot(sb)  # the state after step 1
        sb.exec("echo 2 >> /tmp/steps")
    sb.destroy()
    with dsec.trajectory(tid, client=client) as tr:
        with pytest.raises(SandboxNotFound, match="covers steps < 2"):
            tr.sandbox(_create(client))
        restored = tr.sandbox(_create(client), rebuild=True)
        assert (tr.restored, tr.rebuilt_steps) == ("snapshot+rebuilt", 1)
        for step in range(3):
            assert restored.exec(f"echo {step} >> /tmp/steps").replayed
        assert restored.exec("cat /tmp/steps").text.split() == ["0", "1", "2"]  # step 3, live
        tr.snapshot(restored)  # the state after step 3: complete
    restored.destroy()
    with dsec.trajectory(tid, client=client) as tr:
        again = tr.sandbox(_create(client))  # no opt-in needed: the snapshot covers every logged step
        assert (tr.restored, tr.rebuilt_steps) == ("snapshot", 0)
        for step in range(3):  # the rollout re-issues its calls: all answered from the log
            assert again.exec(f"echo {step} >> /tmp/steps").replayed
        assert again.exec("cat /tmp/steps").replayed
        assert again.exec("cat /tmp/steps").text.split() == ["0", "1", "2"]  # step 4, live
    again.destroy()
    assert export([tid], tmp_path / "t.jsonl", client=client) == 5
    assert export([tid], tmp_path / "t.parquet", client=client) == 5
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.column("stdout").to_pylist()[3:] == [b"0\n1\n2\n"] * 2
