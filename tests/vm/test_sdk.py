"""The VM substrates through the real SDK and an embedded server: what differs from containers.

The shared behaviour (exec, sessions, files, limits, timeouts, errors) is tests/core/test_conformance.py, which
runs on microvm and vm too; here: snapshot / restore / fork, pause / resume, and the reported accelerator.
"""

from __future__ import annotations

import pytest

import dsec

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def client():
    c = dsec.Client()
    yield c
    c.close()


@pytest.fixture(params=["microvm", "vm"])
def vm(request, client):
    sb = client.create("busybox", request.param, memory_mb=256, timeout_s=600)
    yield sb
    try:
        sb.destroy()
    except dsec.DsecError:
        pass


def test_create_reports_accelerator(vm):
    assert vm.refresh().accel in ("kvm", "tcg")
    assert vm.exec("uname -s").stdout == b"Linux\n"


def test_snapshot_restore_fork_through_sdk(client, vm):
    vm.files.write("/root/state.txt", "before snapshot")
    vm.exec("echo in-memory > /dev/shm/ram")
    snapshot_id = vm.snapshot("vm-test")
    vm.files.write("/root/state.txt", "after snapshot")

    restored = dsec.Sandbox.restore(snapshot_id, client=client)
    try:
        assert restored.files.read("/root/state.txt") == b"before snapshot"
        assert restored.files.read("/dev/shm/ram") == b"in-memory\n"
        assert restored.refresh().spec.substrate == vm.info.spec.substrate
    finally:
        restored.destroy()

    forks = vm.fork(2)
    try:
        for index, fork in enumerate(forks):
            assert fork.files.read("/root/state.txt") == b"after snapshot"
            fork.exec(f"echo {index} > /root/who")
        assert [fork.files.read("/root/who") for fork in forks] == [b"0\n", b"1\n"]
    finally:
        for fork in forks:
            fork.destroy()
    assert vm.files.read("/root/state.txt") == b"after snapshot"


def test_paused_sandbox_keeps_file_changes(vm):
    """E2B lost file changes across pause/resume; here the disk and memory are exactly as they were."""
    vm.files.write("/root/draft.txt", "unsaved work")
    vm.exec("echo 7 > /dev/shm/counter")
    vm.pause()
    with pytest.raises(dsec.SandboxStateError):
        vm.exec("true")
    vm.resume()
    assert vm.files.read("/root/draft.txt") == b"unsaved work"
    assert vm.exec("cat /dev/shm/counter; cat /root/draft.txt").stdout == b"7\nunsaved work"


def test_guest_oom_is_reported_as_out_of_memory(client):
    with client.create("busybox", "microvm", memory_mb=256, timeout_s=600) as sb:
        with pytest.raises(dsec.OutOfMemory):
            sb.exec("tail /dev/zero", timeout=120)
        assert sb.exec("echo alive").stdout == b"alive\n"
