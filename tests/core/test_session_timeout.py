"""A session command that times out is interrupted like Ctrl-C in a terminal; the shell and its state live on.

Runs over the whole conformance matrix (tests/core/conftest.py `sandbox`: container crun/runc/docker,
function, microvm, vm). Nothing here depends on speed: each timeout is far shorter than the command it cuts.
"""

from __future__ import annotations

import pytest

import dsec


def test_timeout_interrupts_the_command_and_keeps_the_shell(sandbox):
    with sandbox.session() as shell:
        shell.run("mkdir -p /work/keep && cd /work/keep && export X=kept && y=local")
        shell.run("sleep 1000 & echo $! > /work/keep/bg.pid")

        cut = shell.run("sleep 30; echo never", timeout=2)
        assert cut.timed_out
        assert b"never" not in cut.stdout, "the rest of the command line is abandoned, as with Ctrl-C"
        after = shell.run('echo "$?"; pwd; echo "$X $y"')
        assert after.stdout == b"130\n/work/keep\nkept local\n", "cwd, env, variables and $? survive the timeout"
        assert not after.timed_out and after.exit_code == 0

        loop = shell.run("while :; do :; done", timeout=2)
        assert loop.timed_out, "a loop of shell builtins is interrupted too"

        stubborn = shell.run('trap "" INT; sleep 30', timeout=2)
        assert stubborn.timed_out, "a command that ignores SIGINT is SIGKILLed after the grace"
        assert stubborn.exit_code == 137

        alive = shell.run('kill -0 "$(cat bg.pid)" && echo bg alive; echo "$X"')
        assert alive.stdout == b"bg alive\nkept\n", "a background job of an earlier command is not the timed-out one"
        assert shell.run("false").exit_code == 1
        assert shell.run('echo "$?"').stdout == b"1\n"
        shell.run("set -v")  # the shell now echoes its input to stderr: the markers must not be in that text
        echoed = shell.run("echo after-verbose")
        assert echoed.stdout == b"after-verbose\n" and b"echo after-verbose" in echoed.stderr


def test_kill_session_option_keeps_the_old_behaviour(sandbox):
    shell = sandbox.session(on_timeout="kill_session")
    cut = shell.run("echo started; sleep 30", timeout=2)
    assert cut.timed_out
    with pytest.raises(dsec.SessionNotFound, match="kill_session"):
        shell.run("true")


def test_unknown_on_timeout_and_a_shell_that_exits_are_refused(client):
    with client.create("busybox", "container", driver="crun", memory_mb=128, timeout_s=120) as sb:
        with pytest.raises(dsec.InvalidSpec, match="on_timeout"):
            sb.session(on_timeout="ignore")
        with pytest.raises(dsec.InvalidSpec, match="exited at start"):
            sb.session(shell="/bin/true")


def test_a_shell_named_by_path_lookup_still_kills_a_stubborn_command(client):
    with client.create("busybox", "container", driver="crun", memory_mb=128, timeout_s=120) as sb:
        with sb.session(shell="sh") as shell:  # a shell named without a path (the SIGKILL helper runs it too)
            shell.run("cd /tmp && export KEPT=yes")
            stubborn = shell.run('trap "" INT; sleep 30', timeout=1)
            assert stubborn.timed_out and stubborn.exit_code == 137
            assert shell.run('echo "$PWD $KEPT"').stdout == b"/tmp yes\n"
