"""Filesystem operations and directory watches of the agent (MKDIR, MOVE, REMOVE, STATX, LIST_DIRX, CHOWN,
WATCH/CANCEL), against a real agent binary on the host (each test works under its own tmp dir).

Watch tests act at protocol points: `watch_dir` returns once the agent armed the watch, a change is made, and
the test waits (with a deadline) for the event; nothing depends on sleeping."""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

import pytest

from dsec.agent.client import AgentClient
from dsec.errors import FileExistsInSandbox, FileNotFoundInSandbox, InvalidPath, RuntimeFailure
from dsec.substrates.base import FsEvent

DEADLINE_S = 30.0


def test_make_dir_parents_and_exists(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c"
    client.make_dir(str(target), 0o750)
    assert target.is_dir()
    assert (target.stat().st_mode & 0o777) == 0o750
    with pytest.raises(FileExistsInSandbox):
        client.make_dir(str(target))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidPath) as info:
        client.make_dir(str(tmp_path / "file"))
    assert not isinstance(info.value, FileExistsInSandbox)  # a file in the way is not "already exists"
    with pytest.raises(FileNotFoundInSandbox):
        client.make_dir(str(tmp_path / "missing" / "x"), parents=False)


def test_move_makes_parents_and_reports_missing_source(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "src.txt").write_text("hello")
    client.move(str(tmp_path / "src.txt"), str(tmp_path / "new" / "dir" / "dst.txt"))
    assert (tmp_path / "new" / "dir" / "dst.txt").read_text() == "hello"
    assert not (tmp_path / "src.txt").exists()
    with pytest.raises(FileNotFoundInSandbox):
        client.move(str(tmp_path / "nope"), str(tmp_path / "x"))


def test_remove_recursive_never_follows_symlinks(client: AgentClient, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    tree = tmp_path / "tree"
    (tree / "sub" / "deep").mkdir(parents=True)
    (tree / "sub" / "deep" / "f").write_text("x")
    (tree / "link").symlink_to(outside)
    client.remove(str(tree))
    assert not tree.exists()
    assert (outside / "keep.txt").read_text() == "keep"  # the link went, not what it pointed at
    with pytest.raises(FileNotFoundInSandbox):
        client.remove(str(tree))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    with pytest.raises(InvalidPath):  # ENOTEMPTY without recursive
        client.remove(str(tmp_path / "d"), recursive=False)


def test_stat_info_and_list_dir_info(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_bytes(b"12345")
    (tmp_path / "link").symlink_to("f.txt")
    info = client.stat_info(str(tmp_path / "f.txt"))
    assert (info.type, info.size, info.uid, info.gid) == ("file", 5, os.getuid(), os.getgid())
    link = client.stat_info(str(tmp_path / "link"))
    assert (link.type, link.symlink_target) == ("symlink", "f.txt")
    entries = {e.name: e for e in client.list_dir_info(str(tmp_path))}
    assert entries["f.txt"].size == 5 and entries["link"].symlink_target == "f.txt"
    with pytest.raises(FileNotFoundInSandbox):
        client.stat_info(str(tmp_path / "missing"))


def test_chown_to_own_ids(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    client.chown(str(tmp_path / "f"), os.getuid(), os.getgid())
    with pytest.raises(FileNotFoundInSandbox):
        client.chown(str(tmp_path / "missing"), 0, 0)


def _collector(watch) -> queue.Queue:
    events: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            for event in watch.events():
                events.put(event)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            events.put(exc)
        events.put(None)

    threading.Thread(target=run, daemon=True).start()
    return events


def _wait_for(events: queue.Queue, wanted: FsEvent) -> list[FsEvent]:
    seen: list[FsEvent] = []
    while True:
        event = events.get(timeout=DEADLINE_S)
        assert event is not None and not isinstance(event, Exception), f"watch ended ({event}) before {wanted}; saw {seen}"
        seen.append(event)
        if event == wanted:
            return seen


def test_watch_reports_create_write_rename_remove_chmod(client: AgentClient, tmp_path: Path) -> None:
    watch = client.watch_dir(str(tmp_path))
    events = _collector(watch)
    (tmp_path / "a.txt").write_text("one")
    _wait_for(events, FsEvent("create", "a.txt"))
    _wait_for(events, FsEvent("write", "a.txt"))
    os.chmod(tmp_path / "a.txt", 0o600)
    _wait_for(events, FsEvent("chmod", "a.txt"))
    os.rename(tmp_path / "a.txt", tmp_path / "b.txt")
    _wait_for(events, FsEvent("rename", "a.txt"))
    _wait_for(events, FsEvent("create", "b.txt"))
    (tmp_path / "b.txt").unlink()
    _wait_for(events, FsEvent("remove", "b.txt"))
    watch.cancel()
    assert events.get(timeout=DEADLINE_S) is None  # CANCEL ends the stream with END


def test_watch_recursive_follows_new_directories(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    flat = client.watch_dir(str(tmp_path))
    deep = client.watch_dir(str(tmp_path), recursive=True)
    flat_events, deep_events = _collector(flat), _collector(deep)
    (tmp_path / "old" / "x").write_text("x")
    _wait_for(deep_events, FsEvent("create", "old/x"))
    (tmp_path / "new").mkdir()
    _wait_for(deep_events, FsEvent("create", "new"))
    (tmp_path / "new" / "y").write_text("y")  # the watch on "new" was armed when its create event was read
    _wait_for(deep_events, FsEvent("create", "new/y"))
    # the flat watch saw the directory, never what is inside it
    seen = _wait_for(flat_events, FsEvent("create", "new"))
    flat.cancel()
    while (event := flat_events.get(timeout=DEADLINE_S)) is not None:
        seen.append(event)
    assert all("/" not in e.name for e in seen), seen
    deep.cancel()


def test_watch_ends_when_directory_is_removed_and_rejects_files(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "gone"
    target.mkdir()
    events = _collector(client.watch_dir(str(target)))
    target.rmdir()
    while events.get(timeout=DEADLINE_S) is not None:
        pass  # the stream ends by itself with END
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidPath):
        client.watch_dir(str(tmp_path / "file"))
    with pytest.raises(FileNotFoundInSandbox):
        client.watch_dir(str(tmp_path / "missing"))


def test_watch_dies_with_its_connection(listening, tmp_path: Path) -> None:
    first = listening.connect()
    events = _collector(first.watch_dir(str(tmp_path)))
    first.close()
    woken = events.get(timeout=DEADLINE_S)  # the waiting iterator is woken at once with the loss
    assert isinstance(woken, RuntimeFailure), woken
    second = listening.connect()  # the agent is alive and serves a new connection's watch
    watch = second.watch_dir(str(tmp_path))
    more = _collector(watch)
    (tmp_path / "z").write_text("z")
    _wait_for(more, FsEvent("create", "z"))
    watch.cancel()


def test_malformed_fs_frames_get_einval(client: AgentClient) -> None:
    from dsec.agent.client import MKDIR, MOVE, WATCH

    for ftype in (MKDIR, MOVE, WATCH):
        request, rtype, reply = client._simple(ftype, b"only-one\0", "malformed")
        request.done()
        assert rtype == 0x8F and reply.split(b"\0")[0] == b"22"
    assert client.ping() >= 0
