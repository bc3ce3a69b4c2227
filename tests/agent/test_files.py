"""File operations through a real agent: round trips, metadata, and typed errors for bad paths."""

from __future__ import annotations

import hashlib
import os

import pytest

from dsec.agent.client import AgentClient
from dsec.errors import FileNotFoundInSandbox, InvalidPath
from dsec.models import FileEntry
from dsec.substrates.agent_sandbox import AgentSandbox

from .conftest import PATH_ENV, drain

pytestmark = pytest.mark.timeout(60)


def test_20mb_binary_file_round_trip(client: AgentClient, tmp_path) -> None:
    data = os.urandom(20 << 20)
    path = tmp_path / "big.bin"
    chunks = (data[i : i + 3_000_000] for i in range(0, len(data), 3_000_000))  # larger than one frame
    assert client.write_file(str(path), chunks, mode=0o600) == len(data)
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert path.stat().st_mode & 0o7777 == 0o600
    read = b"".join(client.read_file(str(path)))
    assert read == data


def test_write_creates_parents_truncates_and_honours_mode(client: AgentClient, tmp_path) -> None:
    path = tmp_path / "a" / "b" / "c.sh"
    client.write_file(str(path), [b"long old content"], mode=0o755)
    assert client.write_file(str(path), [b"new", b"", b"!"]) == 4
    assert path.read_bytes() == b"new!"
    assert path.stat().st_mode & 0o7777 == 0o644
    assert client.write_file(str(tmp_path / "empty"), []) == 0
    assert (tmp_path / "empty").read_bytes() == b""


def test_write_without_parents_fails_typed(client: AgentClient, tmp_path) -> None:
    with pytest.raises(FileNotFoundInSandbox):
        client.write_file(str(tmp_path / "no" / "f"), [b"x"], make_parents=False)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(InvalidPath):
        client.write_file(str(tmp_path / "file" / "below"), [b"x"])
    with pytest.raises(InvalidPath):
        client.write_file(str(tmp_path), [b"x"])


def test_read_errors_are_typed(client: AgentClient, tmp_path) -> None:
    with pytest.raises(FileNotFoundInSandbox) as info:
        client.read_file(str(tmp_path / "missing"))
    assert "sb-test" in str(info.value)
    with pytest.raises(InvalidPath):
        client.read_file(str(tmp_path))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InvalidPath):
        client.read_file(str(tmp_path / "fifo"))
    with pytest.raises(InvalidPath):
        client.read_file("")
    with pytest.raises(InvalidPath):
        client.read_file("bad\0path")


def test_list_dir_and_stat(client: AgentClient, tmp_path) -> None:
    (tmp_path / "f").write_bytes(b"12345")
    (tmp_path / "f").chmod(0o640)
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to("f")
    entries = {e.name: e for e in client.list_dir(str(tmp_path))}
    assert set(entries) == {"f", "d", "l"}
    assert (entries["f"].type, entries["f"].size, entries["f"].mode) == ("file", 5, 0o640)
    assert entries["d"].type == "dir" and entries["l"].type == "symlink"
    assert abs(entries["f"].mtime - (tmp_path / "f").stat().st_mtime) < 1e-6
    assert client.stat(str(tmp_path / "f")) == FileEntry(
        name=str(tmp_path / "f"), type="file", size=5, mode=0o640, mtime=entries["f"].mtime
    )
    assert client.list_dir(str(tmp_path / "d")) == []


def test_list_dir_and_stat_errors(client: AgentClient, tmp_path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(FileNotFoundInSandbox):
        client.list_dir(str(tmp_path / "missing"))
    with pytest.raises(InvalidPath):
        client.list_dir(str(tmp_path / "f"))
    with pytest.raises(FileNotFoundInSandbox):
        client.stat(str(tmp_path / "missing"))


def test_large_directory_listing(client: AgentClient, tmp_path) -> None:
    for i in range(2000):
        (tmp_path / f"file-{i:04d}").write_bytes(b"")
    assert sorted(e.name for e in client.list_dir(str(tmp_path))) == [f"file-{i:04d}" for i in range(2000)]


def test_agent_sandbox_delegates(client: AgentClient, tmp_path) -> None:
    sandbox = AgentSandbox("sb-delegate", client)
    path = str(tmp_path / "x")
    assert sandbox.write_file(path, [b"abc"]) == 3
    assert b"".join(sandbox.read_file(path)) == b"abc"
    assert [e.name for e in sandbox.list_dir(str(tmp_path))] == ["x"]
    assert sandbox.stat(path).size == 3
    assert drain(sandbox.spawn(["cat", path], PATH_ENV, "/"))[0] == b"abc"
    assert sandbox.oom_kill_count() == -1


def test_very_long_paths_get_typed_errors(client: AgentClient) -> None:
    long_path = "/" + "a" * 900_000
    for call in (client.stat, client.list_dir, client.read_file):
        with pytest.raises(InvalidPath):
            call(long_path)
    with pytest.raises(InvalidPath):
        client.write_file(long_path, [b"x"])
    assert client.ping() < 5
