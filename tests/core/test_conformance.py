"""One conformance suite for every substrate and driver: exec, sessions, files, limits, timeouts, errors.

The `sandbox` fixture (tests/core/conftest.py) is parametrised over container (crun, runc, docker),
function, microvm and vm; a test here must hold on all of them.
"""

from __future__ import annotations

import pytest

import dsec


def test_exec_stdout_stderr_exit_code(sandbox):
    result = sandbox.exec("echo out; echo err >&2; exit 3")
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"
    assert result.exit_code == 3
    assert not result.timed_out


def test_exec_argv_env_cwd_stdin(sandbox):
    result = sandbox.exec(["sh", "-c", 'pwd; echo "$GREETING"; cat'], env={"GREETING": "hi there"}, cwd="/tmp", stdin=b"from stdin")
    assert result.stdout == b"/tmp\nhi there\nfrom stdin"


def test_exec_streams_chunks_as_they_arrive(sandbox):
    chunks: list[bytes] = []
    result = sandbox.exec("for i in 1 2 3; do echo line$i; sleep 0.2; done", on_stdout=chunks.append)
    assert result.stdout == b"line1\nline2\nline3\n"
    assert len(chunks) >= 2, "output should arrive incrementally, not in one final chunk"


def test_timeout_keeps_partial_output(sandbox):
    result = sandbox.exec("echo before; sleep 30; echo after", timeout=1.0)
    assert result.timed_out
    assert result.stdout == b"before\n"
    assert result.duration_s < 10
    assert sandbox.exec("echo alive").stdout == b"alive\n", "the sandbox survives a timed-out command"


def test_binary_and_non_utf8_output(sandbox):
    result = sandbox.exec(["sh", "-c", r"printf '\377\376\000\001binary'"])
    assert result.stdout == b"\xff\xfe\x00\x01binary"


def test_output_over_cap_is_truncated_with_flag(sandbox):
    result = sandbox.exec("yes abcdefgh | head -c 3000000", max_output_bytes=100_000)
    assert result.stdout_truncated
    assert len(result.stdout) == 100_000
    assert result.exit_code == 0


def test_command_not_found(sandbox):
    with pytest.raises(dsec.CommandNotFound):
        sandbox.exec(["/no/such/binary"])
    assert sandbox.exec("no-such-command-xyz").exit_code == 127


def test_session_keeps_cwd_env_and_variables(sandbox):
    with sandbox.session() as shell:
        shell.run("mkdir -p /work/a && cd /work/a && export ANSWER=42 && local_var=kept")
        result = shell.run('echo "$PWD $ANSWER $local_var"; echo oops >&2; false')
        assert result.stdout == b"/work/a 42 kept\n"
        assert result.stderr == b"oops\n"
        assert result.exit_code == 1
        assert shell.run("cat").stdout == b"", "a command reading stdin must not swallow the session's input"


def test_files_write_read_list_large(sandbox):
    payload = bytes(range(256)) * 20_000  # 5 MB, every byte value
    assert sandbox.files.write("/work/data/blob.bin", payload) == len(payload)
    assert sandbox.files.read("/work/data/blob.bin") == payload
    entries = {e.name: e for e in sandbox.files.list("/work/data")}
    assert entries["blob.bin"].type == "file"
    assert entries["blob.bin"].size == len(payload)
    assert sandbox.exec("wc -c < /work/data/blob.bin").stdout.strip() == str(len(payload)).encode()


def test_file_errors_are_typed(sandbox):
    with pytest.raises(dsec.FileNotFoundInSandbox):
        sandbox.files.read("/no/such/file")
    with pytest.raises(dsec.InvalidPath):
        sandbox.files.read("/../../etc/passwd")
    with pytest.raises(dsec.InvalidPath):
        sandbox.files.write("../outside", b"x")
    with pytest.raises(dsec.InvalidPath):
        sandbox.files.read("/etc/\0passwd")


def test_symlinks_resolve_inside_the_sandbox(sandbox, tmp_path):
    host_secret = tmp_path / "host-secret"
    host_secret.write_text("host only")
    sandbox.exec("echo sandbox-marker > /tmp/marker && ln -sf / /tmp/root-link")
    assert sandbox.files.read("/tmp/root-link/tmp/marker") == b"sandbox-marker\n"
    with pytest.raises(dsec.FileNotFoundInSandbox):
        sandbox.files.read(f"/tmp/root-link{host_secret}")


def test_upload_and_download_trees(sandbox, tmp_path):
    src = tmp_path / "proj"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "mod.py").write_text("X = 1\n")
    (src / "README").write_bytes(b"\x00\x01 binary ok")
    sandbox.upload(src, "/work/up")
    assert sandbox.exec("cat /work/up/proj/pkg/mod.py").stdout == b"X = 1\n"
    sandbox.exec("echo made-inside > /work/up/proj/new.txt")
    back = sandbox.download("/work/up/proj", tmp_path / "back")
    assert (back / "pkg" / "mod.py").read_text() == "X = 1\n"
    assert (back / "README").read_bytes() == b"\x00\x01 binary ok"
    assert (back / "new.txt").read_text() == "made-inside\n"


def test_memory_limit_reports_out_of_memory(sandbox):
    # 256 MB sandbox; awk doubles a string to 64 MB, then keeps fresh 64 MB copies until the limit is hit.
    # Linear in the memory it touches: busybox `tail` growing its buffer 8 KB at a time is quadratic (10-14 s
    # in a VM on a quiet machine, past the timeout on a loaded one).
    hog = """awk 'BEGIN { s = "x"; for (i = 0; i < 26; i++) s = s s; while (1) kept[n++] = s n }'; echo never"""
    with pytest.raises(dsec.OutOfMemory) as info:
        sandbox.exec(hog, timeout=120)
    assert "256" in str(info.value)


def test_destroyed_sandbox_gives_typed_errors(client, sandbox):
    sandbox.destroy()
    with pytest.raises(dsec.SandboxStateError):
        sandbox.exec("true")
    with pytest.raises(dsec.SandboxStateError):
        sandbox.files.read("/etc/hostname")
    sandbox.destroy()  # idempotent


def test_get_list_labels_set_timeout(client, case):
    substrate, driver, image = case
    with client.create(image, substrate, driver=driver, labels={"suite": "conformance", "case": substrate}) as sb:
        listed = [info.id for info in client.list({"suite": "conformance", "case": substrate})]
        assert sb.id in listed
        assert sb.id not in [info.id for info in client.list({"suite": "other"})]
        before = sb.refresh().expires_at
        sb.set_timeout(5000)
        assert sb.info.expires_at > before


def test_snapshot_restore_fork_list_delete(client, sandbox):
    """The same snapshot life cycle on every substrate: restore sees the state at snapshot time, forks are
    independent copies, fork leaves no snapshot behind, and a deleted snapshot is gone for good."""
    sandbox.files.write("/tmp/state.txt", b"at-snapshot")
    snapshot_id = sandbox.snapshot("conformance")
    sandbox.files.write("/tmp/state.txt", b"after")
    listed = {ref.snapshot_id: ref for ref in client.snapshots(sandbox.id)}
    assert listed[snapshot_id].name == "conformance" and listed[snapshot_id].size_bytes > 0
    with client.restore(snapshot_id) as restored:
        assert restored.files.read("/tmp/state.txt") == b"at-snapshot"
    forks = sandbox.fork(2)
    try:
        forks[0].files.write("/tmp/state.txt", b"fork-0")
        assert forks[1].files.read("/tmp/state.txt") == b"after"
        assert sandbox.files.read("/tmp/state.txt") == b"after"
    finally:
        for fork in forks:
            fork.destroy()
    assert [ref.snapshot_id for ref in client.snapshots(sandbox.id)] == [snapshot_id]  # fork's own is gone
    client.delete_snapshot(snapshot_id)
    assert client.snapshots(sandbox.id) == []
    with pytest.raises(dsec.SnapshotNotFound):
        client.restore(snapshot_id)
    with pytest.raises(dsec.SnapshotNotFound):
        client.delete_snapshot(snapshot_id)
