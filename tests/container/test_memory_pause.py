"""Pause kinds of crun/runc containers through the real SDK and an embedded server (docs/lifecycle.md).

memory (CRIU through runc, and through crun where it is built with CRIU: infra/setup.d/32-crun.sh): a detached
shell loop holding a counter and a random number only in its variables answers over a fifo; after pause + resume
it answers with the same number and the next count, while paused the sandbox's cgroup is gone (no process, no
memory). Where CRIU cannot (a crun without +CRIU, a failing `criu check`) it is refused, typed, with the reason.
files: the container's processes, cgroup and memory are gone while paused; its files come back on resume.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator

import pytest

import dsec
from dsec.agent.client import AgentClient
from dsec.errors import RuntimeFailure, SandboxStateError, Unsupported
from dsec.substrates.container import bundle, cgroups
from dsec.substrates.container.criu import criu_probe, runtime_criu_refusal
from dsec.substrates.container.driver import ContainerSandbox
from dsec.substrates.container.record import ContainerRecord
from dsec.substrates.container.runtime import runtime_binary

pytestmark = pytest.mark.timeout(300)
DEADLINE_S = 120.0  # bounds a failure only
SERVER = 'n=0; s=$RANDOM$RANDOM; while :; do read line < /tmp/in; n=$((n+1)); echo "$n $s $line" > /tmp/out; done'


def start_counter(sb: dsec.Sandbox) -> None:
    result = sb.exec(f"mkfifo /tmp/in /tmp/out && setsid sh -c '{SERVER}' </dev/null >/dev/null 2>&1 &")
    assert result.exit_code == 0, result.stderr


def ask(sb: dsec.Sandbox, word: str) -> tuple[int, str, str]:
    """One round trip to the counter: (count, its random number, the word echoed back)."""
    count, secret, echoed = sb.exec(f"echo {word} > /tmp/in && cat /tmp/out", timeout=60).text.split()
    return int(count), secret, echoed


@pytest.fixture(scope="module")
def client():
    c = dsec.Client()
    yield c
    c.close()


@pytest.fixture(params=["crun", "runc"])
def make_sb(request, client):
    made: list[dsec.Sandbox] = []

    def make(**kwargs) -> dsec.Sandbox:
        sb = client.create("busybox", "container", driver=request.param, **({"timeout_s": 600} | kwargs))
        made.append(sb)
        return sb

    yield make
    for sb in made:
        try:
            sb.destroy()
        except dsec.DsecError:
            pass


def cgroup_procs(sandbox_id: str) -> list[int]:
    """Pids in the sandbox's cgroup (any hierarchy); [] when the cgroup is gone."""
    pids: set[int] = set()
    for directory in cgroups.existing_dirs(bundle.cgroups_path(sandbox_id)):
        try:
            pids |= {int(p) for p in (directory / "cgroup.procs").read_text().split()}
        except OSError:
            pass
    return sorted(pids)


def test_probe_says_whether_criu_runs_and_why():
    verdict = criu_probe()
    assert verdict.version and verdict.path, "criu is installed (infra/setup.d/00-apt.sh, 31-criu.sh)"
    assert verdict.reason.startswith(f"criu {verdict.version}")
    if not verdict.works:
        assert "vDSO" in verdict.reason or "criu check failed" in verdict.reason


def criu_refusal(driver: str) -> str:
    """Why a memory pause of a `driver` sandbox is refused here ("" when it is not), as the driver decides."""
    return runtime_criu_refusal(driver, runtime_binary(driver)) or ("" if criu_probe().works else criu_probe().reason)


def assert_refused(sb: dsec.Sandbox, reason: str) -> None:
    """A memory pause refused, typed, naming `reason`, and the sandbox left running as it was."""
    sb.exec("echo kept > /tmp/note")
    with pytest.raises(Unsupported) as caught:
        sb.pause(memory=True)
    assert "needs CRIU" in str(caught.value) and reason in str(caught.value)
    assert sb.refresh().state == "running", "a refused pause leaves the sandbox as it was"
    assert sb.exec("cat /tmp/note").text == "kept\n"


DEBIAN_CRUN = "/usr/bin/crun"  # bookworm's package (00-apt.sh): 1.8.1, built without CRIU


def test_a_crun_without_criu_refuses_memory_pause(monkeypatch):
    """A server whose crun lacks +CRIU ($DSEC_CRUN = Debian's) refuses a crun memory pause, typed, naming it."""
    assert "+CRIU" not in subprocess.run([DEBIAN_CRUN, "--version"], capture_output=True, text=True).stdout.split()
    monkeypatch.setenv("DSEC_CRUN", DEBIAN_CRUN)
    with dsec.Client() as own:  # its own embedded server, started with that environment
        sb = own.create("busybox", "container", driver="crun", timeout_s=600)
        try:
            assert_refused(sb, f"{DEBIAN_CRUN} (crun version 1.8.1) is built without CRIU")
        finally:
            sb.destroy()


@contextlib.contextmanager
def counting_sandbox(client: dsec.Client, driver: str) -> Iterator[tuple[dsec.Sandbox, int, str] | None]:
    """A `driver` sandbox running the counter, with its first answer (count, secret); destroyed after. None where
    a memory pause is refused here, once the refusal is checked to carry why (crun without +CRIU, a failing probe)."""
    sb = client.create("busybox", "container", driver=driver, timeout_s=600)
    try:
        if reason := criu_refusal(driver):
            assert_refused(sb, reason)
            yield None
            return
        start_counter(sb)
        first, secret, _ = ask(sb, "before")
        yield sb, first, secret
    finally:
        sb.destroy()


@pytest.mark.parametrize("driver", ["crun", "runc"])
def test_memory_pause_keeps_processes(client, driver):
    """CRIU through the runtime; where it cannot (crun without +CRIU, a failing probe) the refusal carries why."""
    with counting_sandbox(client, driver) as counting:
        if counting is None:
            return
        sb, first, secret = counting
        sb.exec("echo kept > /root/note")
        sb.pause(memory=True)
        assert sb.info.state == "paused"
        assert cgroup_procs(sb.id) == [], "no process is left (no CPU)"
        assert cgroups.memory_usage(bundle.cgroups_path(sb.id))[0] == 0, "no memory is charged to the sandbox"
        with pytest.raises(SandboxStateError):
            sb.exec("true")
        sb.resume()
        assert ask(sb, "after") == (first + 1, secret, "after"), "the process and its memory came back"
        assert sb.exec("cat /root/note").text == "kept\n"
        sb.pause(memory=True)  # a second round from the restored container
        sb.resume()
        assert ask(sb, "again") == (first + 2, secret, "again")


# a process holding a deleted 2 MB file open: CRIU saves deleted files up to its 1 MB ghost-file limit only
GHOST_HOLDER = ("dd if=/dev/zero of=/tmp/ghost bs=1M count=2 2>/dev/null && exec 3</tmp/ghost && rm /tmp/ghost && "
                "{ setsid sleep 100000 </dev/null >/dev/null 2>&1 & }")


@pytest.mark.parametrize("driver", ["crun", "runc"])
def test_a_memory_pause_criu_cannot_make_says_why_and_the_sandbox_runs_on(client, driver):
    """A process CRIU cannot save: the pause fails at once, typed, with CRIU's own reason (not a timeout of
    the agent reconnect that follows), and the sandbox, its processes and their memory run on."""
    with counting_sandbox(client, driver) as counting:
        if counting is None:
            return
        sb, first, secret = counting
        assert sb.exec(GHOST_HOLDER).exit_code == 0
        with pytest.raises(RuntimeFailure) as failed:
            sb.pause(memory=True)
        assert "checkpoint" in str(failed.value) and "ghost" in str(failed.value), str(failed.value)
        assert sb.refresh().state == "running"
        assert ask(sb, "after") == (first + 1, secret, "after"), "the processes ran on with their memory"


class _RuntimeAfterFailedDump:
    """What the OCI runtime says of a container that did not survive a failed checkpoint."""

    def __init__(self, state: dict | None) -> None:
        self._state = state

    def state(self, container_id: str) -> dict | None:
        return self._state


@pytest.mark.parametrize("state", [None, {"status": "stopped"}])
def test_a_dump_that_took_the_container_down_says_so_with_criu_reason_at_once(tmp_path, state):
    """Where the container is gone after a failed checkpoint, the error keeps CRIU's reason and says the sandbox
    is lost, without first waiting for the agent's socket (30 s) as a reattach would."""
    record = ContainerRecord(sandbox_id="sb-0123456789abcdef", runtime="runc", runtime_root=str(tmp_path),
                             container_id="sb-0123456789abcdef", cgroups_path="/dsec/sb-0123456789abcdef",
                             rootfs=str(tmp_path / "rootfs"))
    client = AgentClient.detached("sb-0123456789abcdef")
    sandbox = ContainerSandbox(client, record, _RuntimeAfterFailedDump(state), tmp_path)
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeFailure) as failed:
            sandbox._continue_after_failed_dump(RuntimeFailure("Can't dump ghost file /tmp/ghost"))
    finally:
        client.close()
    assert "Can't dump ghost file /tmp/ghost" in failed.value.message
    assert "did not survive" in failed.value.message and failed.value.details == {"sandbox_id": "sb-0123456789abcdef"}
    assert time.monotonic() - started < 5.0, "no wait for an agent that is gone"


ECHO_COUNTER = 'n=0; s=$RANDOM$RANDOM; while read line; do n=$((n+1)); echo "$n $s $line"; done'


@pytest.mark.parametrize("driver", ["crun", "runc"])
def test_memory_pause_keeps_sessions_and_process_streams(client, driver):
    """The host parks its agent connection (DETACH) for the checkpoint and reattaches after the restore: a
    session's shell keeps its variables and cwd, and a process started through ProcessService keeps its memory
    (a counter) and its open stdin/stdout stream."""
    sb = client.create("busybox", "container", driver=driver, timeout_s=600)
    try:
        if reason := criu_refusal(driver):
            assert_refused(sb, reason)
            return
        session = sb.session()
        assert session.run("export X=41; Y=local; cd /tmp").exit_code == 0
        proc = sb.processes.start(ECHO_COUNTER, stdin=True)
        lines = iter(proc)

        def reply(word: str) -> tuple[int, str, str]:
            proc.send_input(word + "\n")
            out = b""
            while not out.endswith(b"\n"):
                out += next(lines).data
            count, secret, echoed = out.decode().split()
            return int(count), secret, echoed

        first, secret, _ = reply("before")
        for round_ in (1, 2):  # a second round from the restored container
            sb.pause(memory=True)
            assert cgroup_procs(sb.id) == [], "no process is left (no CPU)"
            sb.resume()
            assert session.run("echo $X $Y $(pwd)").text == "41 local /tmp\n", "the session's shell came back"
            assert reply(f"after{round_}") == (first + round_, secret, f"after{round_}"), "the stream carried on"
        proc.close_stdin()
        assert proc.wait().exit_code == 0
        assert session.run("echo new session works").exit_code == 0
    finally:
        sb.destroy()


def test_files_pause_ends_processes_and_keeps_files(make_sb):
    sb = make_sb()
    sb.exec("echo kept > /root/note && setsid sleep 1000 </dev/null >/dev/null 2>&1 &")
    assert len(cgroup_procs(sb.id)) >= 2, "the agent and the sleep run in the sandbox's cgroup"

    sb.pause(memory=False)
    assert sb.info.state == "paused"
    assert cgroup_procs(sb.id) == [], "no process is left (no CPU)"
    used, _ = cgroups.memory_usage(bundle.cgroups_path(sb.id))
    assert used == 0, "no memory is charged to the sandbox"
    with pytest.raises(SandboxStateError):
        sb.exec("true")

    sb.resume()
    assert sb.exec("cat /root/note").text == "kept\n", "the files survived"
    assert "sleep 1000" not in sb.exec("ps -o args").text, "the processes did not"
    sb.exec("echo again > /root/again")
    assert sb.exec("cat /root/again").text == "again\n"


def test_default_pause_freezes_in_place(make_sb):
    sb = make_sb()
    sb.exec("setsid sleep 1000 </dev/null >/dev/null 2>&1 &")
    sb.pause()
    assert cgroups.is_frozen(bundle.cgroups_path(sb.id)) and len(cgroup_procs(sb.id)) >= 2
    sb.resume()
    assert "sleep 1000" in sb.exec("ps -o args").text


def test_auto_resume_resumes_on_the_next_call(make_sb):
    sb = make_sb(auto_resume=True)
    sb.exec("echo kept > /root/note")
    sb.pause(memory=False)
    assert cgroup_procs(sb.id) == []
    assert sb.exec("cat /root/note").text == "kept\n", "the exec resumed it first"
    assert sb.refresh().state == "running"
    sb.pause()
    session = sb.session()
    assert session.run("echo in a session").text == "in a session\n"


def test_on_timeout_pause_keeps_memory_where_it_can_else_freezes(make_sb):
    sb = make_sb(on_timeout="pause")
    sb.exec("setsid sleep 1000 </dev/null >/dev/null 2>&1 &")
    sb.set_timeout(1)
    deadline = time.monotonic() + DEADLINE_S
    while sb.refresh().state != "paused":
        assert time.monotonic() < deadline, "the timeout did not pause the sandbox"
    if not criu_refusal(sb.info.driver):
        assert cgroup_procs(sb.id) == [], "CRIU: the timeout's pause saved it to disk"
    else:
        assert cgroups.is_frozen(bundle.cgroups_path(sb.id)), "no CRIU for it: the timeout froze it in place"
    sb.resume()
    assert "sleep 1000" in sb.exec("ps -o args").text


@pytest.mark.parametrize("driver", ["crun", "runc"])
def test_memory_pause_of_an_allowlisted_sandbox_is_refused(client, driver):
    """Its network namespace (made by the host for the allowlist) is not its user namespace's: CRIU cannot
    enter it, so the refusal comes first, typed, and the sandbox runs on."""
    sb = client.create("busybox", "container", driver=driver, network_allow=["1.1.1.1"], timeout_s=600)
    try:
        assert_refused(sb, criu_refusal(driver) or "network namespace")
    finally:
        sb.destroy()
