"""Fork of a running runc container carries its processes (CRIU checkpoint --leave-running, restored per fork
into its own rootfs copy, cgroup, network namespace and user-namespace id range); a crun without CRIU forks
files-only.

Through the real SDK and an embedded server: a counter process (its count and a random number only in a shell's
memory, answering over fifos) started before the fork answers in every fork with the count it had reached, and
each fork counts on by itself; the source runs on; a session variable set before the fork is kept by the source.
"""

from __future__ import annotations

import pytest

import dsec
from dsec.substrates.container.criu import criu_probe
from tests.container.test_memory_pause import ask, cgroup_procs, start_counter

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def client():
    c = dsec.Client()
    yield c
    c.close()


def destroy_all(sandboxes: list[dsec.Sandbox]) -> None:
    for sb in sandboxes:
        try:
            sb.destroy()
        except dsec.DsecError:
            pass


def host_uid(sandbox_id: str, pids: list[int]) -> set[int]:
    """The host uids the sandbox's processes run as (their user namespace's range)."""
    uids = set()
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("Uid:"):
                    uids.add(int(line.split()[1]))
        except OSError:
            pass
    return uids


def test_fork_of_a_running_runc_container_carries_its_processes(client):
    assert criu_probe().works, criu_probe().reason
    source = client.create("busybox", "container", driver="runc", timeout_s=600)
    made = [source]
    try:
        start_counter(source)
        source.exec("setsid sleep 1000 </dev/null >/dev/null 2>&1 &")
        session = source.session()
        assert session.run("export X=41; cd /tmp").exit_code == 0
        first, secret, _ = ask(source, "before")

        forks = source.fork(2)
        made += forks
        for fork in forks:
            assert fork.info.spec.labels["dsec.fork_kind"] == "processes"
            assert fork.info.spec.labels["dsec.fork_of"] == source.id
            assert "sleep 1000" in fork.exec("ps -o args").text, "the background process exists in the fork"
        for step, fork in enumerate(forks, start=1):
            assert ask(fork, f"fork{step}") == (first + 1, secret, f"fork{step}"), "the fork's copy counts on alone"
            assert ask(fork, "again") == (first + 2, secret, "again")
        assert ask(source, "source") == (first + 1, secret, "source"), "the source ran on, its count its own"
        assert session.run("echo $X $(pwd)").text == "41 /tmp\n", "the source's session survived the checkpoint"

        source_uids = host_uid(source.id, cgroup_procs(source.id))
        for fork in forks:
            fork_uids = host_uid(fork.id, cgroup_procs(fork.id))
            assert fork_uids and fork_uids.isdisjoint(source_uids), "each fork runs in its own host id range"
            fork.exec("echo mine > /root/own")
            assert fork.exec("cat /root/own").text == "mine\n", "the fork writes its own rootfs copy"
        assert source.exec("cat /root/own 2>/dev/null || echo absent").text == "absent\n"
    finally:
        destroy_all(made)


def test_fork_of_a_crun_container_carries_processes_only_with_criu(client):
    """A crun without CRIU (Debian bookworm's 1.8.1) forks files-only, and the label says so."""
    source = client.create("busybox", "container", driver="crun", timeout_s=600)
    made = [source]
    try:
        source.exec("echo kept > /root/note && setsid sleep 1000 </dev/null >/dev/null 2>&1 &")
        try:
            source.pause(memory=True)
            source.resume()
            carries = True
        except dsec.Unsupported:
            carries = False
        (fork,) = source.fork(1)
        made.append(fork)
        assert fork.info.spec.labels["dsec.fork_kind"] == ("processes" if carries else "filesystem")
        assert fork.exec("cat /root/note").text == "kept\n"
        assert ("sleep 1000" in fork.exec("ps -o args").text) == carries
    finally:
        destroy_all(made)
