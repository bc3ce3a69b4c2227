"""Pause that keeps memory, for VMs: QMP migrate of the guest to a file, then QEMU exits (no CPU, no RAM held);
resume starts QEMU with `-incoming` on that file. Through the real SDK and an embedded server.

The proof that memory survived: a shell loop started in the background holds a counter and a random number in
its own variables (nowhere on disk) and answers over a fifo; after pause + resume it answers with the same
number and the next count.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import dsec
from dsec.errors import SandboxStateError, Unsupported

pytestmark = pytest.mark.timeout(600)
DEADLINE_S = 240.0  # bounds a failure only (TCG on a loaded 2-core host)
SERVER = 'n=0; s=$RANDOM$RANDOM; while :; do read line < /tmp/in; n=$((n+1)); echo "$n $s $line" > /tmp/out; done'


def start_counter(sb: dsec.Sandbox) -> None:
    result = sb.exec(f"mkfifo /tmp/in /tmp/out && setsid sh -c '{SERVER}' </dev/null >/dev/null 2>&1 &")
    assert result.exit_code == 0, result.stderr


def ask(sb: dsec.Sandbox, word: str) -> tuple[int, str, str]:
    """One round trip to the counter: (count, its random number, the word echoed back)."""
    result = sb.exec(f"echo {word} > /tmp/in && cat /tmp/out", timeout=60)
    count, secret, echoed = result.text.split()
    return int(count), secret, echoed


def qemu_pids(sandbox_id: str) -> list[int]:
    """QEMU processes whose command line names this sandbox (its state directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-system-x86_64") and any(sandbox_id.encode() in a for a in argv):
            found.append(int(proc.name))
    return found


@pytest.fixture(scope="module")
def client():
    c = dsec.Client()
    yield c
    c.close()


@pytest.fixture
def make_vm(client):
    made: list[dsec.Sandbox] = []

    def make(substrate: str = "microvm", **kwargs) -> dsec.Sandbox:
        sb = client.create("busybox", substrate, memory_mb=256, **({"timeout_s": 600} | kwargs))
        made.append(sb)
        return sb

    yield make
    for sb in made:
        try:
            sb.destroy()
        except dsec.DsecError:
            pass


@pytest.mark.parametrize("substrate", ["microvm", "vm"])
def test_memory_pause_frees_qemu_and_keeps_processes(make_vm, substrate):
    sb = make_vm(substrate)
    start_counter(sb)
    sb.exec("echo on the disk > /root/kept.txt")
    first, secret, _ = ask(sb, "before")
    assert qemu_pids(sb.id), "a running VM has its QEMU"
    session = sb.session()
    session.run("cd /tmp && X=42")

    sb.pause(memory=True)
    assert sb.info.state == "paused"
    assert qemu_pids(sb.id) == [], "a memory-paused VM holds no QEMU process (so no CPU and no RAM)"
    with pytest.raises(SandboxStateError):
        sb.exec("true")  # created without auto_resume

    sb.resume()
    assert ask(sb, "after") == (first + 1, secret, "after"), "the process and its memory came back"
    assert session.run("echo $X $PWD").text == "42 /tmp\n", "the session's shell lived through the pause"
    assert sb.exec("cat /root/kept.txt").text == "on the disk\n"
    assert len(qemu_pids(sb.id)) == 1

    sb.pause(memory=True)  # a second round from the restored machine
    sb.resume()
    assert ask(sb, "again") == (first + 2, secret, "again")


def test_auto_resume_brings_a_paused_vm_back_on_the_next_call(make_vm):
    sb = make_vm(auto_resume=True)
    start_counter(sb)
    first, secret, _ = ask(sb, "one")
    sb.pause(memory=True)
    assert qemu_pids(sb.id) == []
    assert ask(sb, "two") == (first + 1, secret, "two"), "the exec resumed it first"
    assert sb.refresh().state == "running"


def test_on_timeout_pause_keeps_memory_on_disk(make_vm):
    sb = make_vm(on_timeout="pause")
    start_counter(sb)
    first, secret, _ = ask(sb, "one")
    sb.set_timeout(1)
    deadline = time.monotonic() + DEADLINE_S
    while sb.refresh().state != "paused":
        assert time.monotonic() < deadline, "the timeout did not pause the sandbox"
    assert qemu_pids(sb.id) == [], "the timeout's pause kept memory on disk, not in a stopped QEMU"
    sb.resume()
    assert ask(sb, "two") == (first + 1, secret, "two")


def test_files_only_pause_is_refused_for_vms(make_vm):
    sb = make_vm()
    with pytest.raises(Unsupported, match="page cache"):
        sb.pause(memory=False)
    assert sb.refresh().state == "running" and sb.exec("echo ok").text == "ok\n"


def test_fork_carries_running_processes(make_vm):
    """A VM fork is a memory snapshot: each fork has its own copy of the counter, at the same count."""
    sb = make_vm()
    start_counter(sb)
    first, secret, _ = ask(sb, "parent")
    forks = sb.fork(1)
    try:
        assert ask(forks[0], "child") == (first + 1, secret, "child")
        assert ask(sb, "parent") == (first + 1, secret, "parent"), "the parent's counter is its own"
    finally:
        for fork in forks:
            fork.destroy()
