"""The real `e2b` SDK (sync and async) driving files through dsec's envd door: `filesystem.Filesystem` (Connect
RPC) and envd's HTTP `/files` + `/health`, on the container (crun) and function substrates.

Covers text/bytes/stream reads and writes (one file and many, multipart and octet-stream, gzip both ways),
list depth, exists, get_info (owner, permissions), rename, remove, make_dir, both watch APIs (polling watcher
and the streamed WatchDir), the default user `user` owning what it writes, path traversal and symlinks that
point out of the sandbox (resolved inside it, never on the host), oversized uploads (413), and the same
FilesystemService through dsec's own SDK, directly and through a cluster gateway.

Watch tests act at protocol points: the watch is armed when the SDK call returns, a file is written, then the
test waits for the event under a deadline."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import io
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from e2b import AsyncSandbox, FileType, Sandbox
from e2b.exceptions import FileNotFoundException, InvalidArgumentException, NotFoundException, SandboxException
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsec
from dsec.cluster.gateway import Gateway, serve_gateway
from dsec.cluster.placement import Capacity
from dsec.errors import DsecError, FileNotFoundInSandbox

from .conftest import start_dsec_http

pytestmark = pytest.mark.timeout(300)

DEADLINE_S = 30.0
SUBSTRATES = [pytest.param({}, id="container"), pytest.param({"dsec.substrate": "function"}, id="function")]


@pytest.fixture(scope="module", params=SUBSTRATES)
def sandbox(request, dsec_http):
    """One E2B sandbox of the `base` template per substrate, shared by this module's tests (each test works in
    its own directory)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in dsec_http.env.items():
            patch.setenv(key, value)
        patch.delenv("E2B_DEBUG", raising=False)
        sb = Sandbox.create("base", timeout=600, metadata={"suite": "files", **request.param})
        try:
            yield sb
        finally:
            sb.kill()


@pytest.fixture
def workdir(sandbox, e2b_env) -> str:
    path = f"/tmp/t-{uuid.uuid4().hex[:8]}"
    sandbox.files.make_dir(path)
    return path


def _envd_headers(sandbox_id: str, token: str | None = None) -> dict[str, str]:
    """What the SDK sends to envd: the routing header and, for a secure sandbox, its envd access token."""
    return {"E2b-Sandbox-Id": sandbox_id, **({"X-Access-Token": token} if token else {})}


def _envd(dsec_http, sandbox_id: str, token: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=dsec_http.http_url, headers=_envd_headers(sandbox_id, token), timeout=DEADLINE_S)


# -- reads and writes -------------------------------------------------------------------------------------------
def test_write_and_read_text_bytes_streams(sandbox, workdir):
    text = "héllo\nworld\n"
    info = sandbox.files.write(f"{workdir}/t.txt", text)
    assert (info.name, info.type, info.path) == ("t.txt", FileType.FILE, f"{workdir}/t.txt")
    assert sandbox.files.read(f"{workdir}/t.txt") == text
    blob = bytes(range(256)) * 4096  # 1 MiB, every byte value
    sandbox.files.write(f"{workdir}/b.bin", blob)
    assert sandbox.files.read(f"{workdir}/b.bin", format="bytes") == bytearray(blob)
    with sandbox.files.read(f"{workdir}/b.bin", format="stream") as stream:
        assert b"".join(stream) == blob
    sandbox.files.write(f"{workdir}/io.bin", io.BytesIO(blob))  # a file object: streamed as octet-stream
    sandbox.files.write(f"{workdir}/it.bin", (blob[i : i + 70000] for i in range(0, len(blob), 70000)))  # iterable
    sandbox.files.write(f"{workdir}/gz.bin", blob, gzip=True)  # Content-Encoding: gzip upload
    for name in ("io.bin", "it.bin", "gz.bin"):
        assert sandbox.files.read(f"{workdir}/{name}", format="bytes", gzip=True) == bytearray(blob), name
    sandbox.files.write(f"{workdir}/text-io.txt", io.StringIO(text))  # text file object: encoded while streamed
    assert sandbox.files.read(f"{workdir}/text-io.txt") == text
    sandbox.files.write(f"{workdir}/empty", b"")
    assert sandbox.files.read(f"{workdir}/empty") == ""


def test_write_files_many_at_once_and_parents_created(sandbox, workdir):
    entries = [{"path": f"{workdir}/deep/a/{i}.txt", "data": f"file {i}"} for i in range(5)]
    infos = sandbox.files.write_files(entries)
    assert [i.path for i in infos] == [e["path"] for e in entries]
    for entry in entries:
        assert sandbox.files.read(entry["path"]) == entry["data"]
    big = bytes(range(251)) * 40_000  # ~10 MB, streamed part by part to the sandbox, never spooled on the host
    sandbox.files.write(f"{workdir}/big.bin", io.BytesIO(big), use_octet_stream=False)
    assert sandbox.files.read(f"{workdir}/big.bin", format="bytes") == bytearray(big)


def test_relative_paths_and_default_user(sandbox, workdir):
    name = f"rel-{uuid.uuid4().hex[:6]}.txt"
    info = sandbox.files.write(name, "mine")  # relative: the default user's home
    assert info.path == f"/home/user/{name}"
    entry = sandbox.files.get_info(f"~/{name}")
    assert (entry.owner, entry.group) == ("user", "user")
    assert sandbox.commands.run(f"cat /home/user/{name}", user="user").stdout == "mine"
    root_file = sandbox.files.write(f"{workdir}/root.txt", "r", user="root")
    assert sandbox.files.get_info(root_file.path).owner == "root"
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read(name, user="nobody-" + uuid.uuid4().hex[:6])  # not in the sandbox's /etc/passwd


def test_missing_file_and_directory_reads(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"{workdir}/missing.txt")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read(workdir)  # a directory is not a file


# -- metadata and tree operations --------------------------------------------------------------------------------
def test_list_depth_exists_and_info(sandbox, workdir):
    sandbox.files.write(f"{workdir}/top.txt", "t")
    sandbox.files.write(f"{workdir}/d1/mid.txt", "m")
    sandbox.files.write(f"{workdir}/d1/d2/low.txt", "l")
    one = {e.path for e in sandbox.files.list(workdir)}
    assert one == {f"{workdir}/top.txt", f"{workdir}/d1"}
    two = {e.path for e in sandbox.files.list(workdir, depth=2)}
    assert two == one | {f"{workdir}/d1/mid.txt", f"{workdir}/d1/d2"}
    three = {e.path: e for e in sandbox.files.list(workdir, depth=3)}
    assert three[f"{workdir}/d1/d2/low.txt"].type == FileType.FILE and three[f"{workdir}/d1"].type == FileType.DIR
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(workdir, depth=0)
    assert sandbox.files.exists(f"{workdir}/d1") and not sandbox.files.exists(f"{workdir}/nope")
    info = sandbox.files.get_info(f"{workdir}/top.txt")
    assert (info.name, info.size, info.permissions, info.mode) == ("top.txt", 1, "-rw-r--r--", 0o644)
    assert abs(info.modified_time.timestamp() - time.time()) < 600
    sandbox.commands.run(f"ln -s top.txt {workdir}/link", user="root")
    link = sandbox.files.get_info(f"{workdir}/link")
    assert (link.type, link.symlink_target) == (FileType.SYMLINK, "top.txt")
    with pytest.raises(FileNotFoundException):
        sandbox.files.get_info(f"{workdir}/nope")
    with pytest.raises(FileNotFoundException):
        sandbox.files.list(f"{workdir}/nope")


def test_rename_remove_make_dir(sandbox, workdir):
    sandbox.files.write(f"{workdir}/old.txt", "content")
    moved = sandbox.files.rename(f"{workdir}/old.txt", f"{workdir}/new/place.txt")
    assert (moved.path, moved.name, moved.size) == (f"{workdir}/new/place.txt", "place.txt", 7)
    assert not sandbox.files.exists(f"{workdir}/old.txt")
    with pytest.raises(FileNotFoundException):
        sandbox.files.rename(f"{workdir}/old.txt", f"{workdir}/x.txt")
    image_dir = sandbox.files.rename("/etc/apt", f"{workdir}/apt")  # a directory of the image: EXDEV on overlayfs
    assert image_dir.type == FileType.DIR and sandbox.files.exists(f"{workdir}/apt/sources.list.d")
    assert not sandbox.files.exists("/etc/apt")
    sandbox.files.rename(f"{workdir}/apt", "/etc/apt")  # put back what other tests of the module may expect
    assert sandbox.files.make_dir(f"{workdir}/made/deep") is True
    assert sandbox.files.make_dir(f"{workdir}/made/deep") is False
    with pytest.raises(InvalidArgumentException):
        sandbox.files.make_dir(f"{workdir}/new/place.txt")  # a file is in the way
    sandbox.files.write(f"{workdir}/made/deep/f", "x")
    sandbox.files.remove(f"{workdir}/made")  # recursive
    assert not sandbox.files.exists(f"{workdir}/made")
    sandbox.files.remove(f"{workdir}/made")  # missing: fine, as envd's RemoveAll


# -- watches --------------------------------------------------------------------------------------------------------
def _poll_until(handle, wanted: set[tuple[str, FilesystemEventType]]) -> list:
    """Ask the polling watcher (one request per poll) until every wanted (name, type) came, under a deadline."""
    seen: list = []
    deadline = time.monotonic() + DEADLINE_S
    while not wanted <= {(e.name, e.type) for e in seen}:
        assert time.monotonic() < deadline, f"missing {wanted}; saw {seen}"
        seen += handle.get_new_events()
        time.sleep(0.05)
    return seen


def test_watch_dir_polling_sees_writes_and_removes(sandbox, workdir):
    handle = sandbox.files.watch_dir(workdir)
    sandbox.files.write(f"{workdir}/w.txt", "one")
    _poll_until(handle, {("w.txt", FilesystemEventType.CREATE), ("w.txt", FilesystemEventType.WRITE)})
    sandbox.files.rename(f"{workdir}/w.txt", f"{workdir}/v.txt")
    sandbox.files.remove(f"{workdir}/v.txt")
    _poll_until(handle, {("w.txt", FilesystemEventType.RENAME), ("v.txt", FilesystemEventType.REMOVE)})
    handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()
    recursive = sandbox.files.watch_dir(workdir, recursive=True)
    sandbox.files.write(f"{workdir}/sub/inner.txt", "i")  # the directory is created by this very write
    _poll_until(recursive, {("sub", FilesystemEventType.CREATE)})
    sandbox.files.write(f"{workdir}/sub/later.txt", "l")
    _poll_until(recursive, {("sub/later.txt", FilesystemEventType.WRITE)})
    recursive.stop()


def test_unknown_watcher_is_not_found(sandbox, e2b_env):
    from e2b.sandbox_sync.filesystem.watch_handle import WatchHandle

    fake = WatchHandle(sandbox.files._rpc, "no-such-watcher", sandbox.connection_config, sandbox.files._envd_version)
    with pytest.raises(NotFoundException):
        fake.get_new_events()


def test_async_sdk_files_and_streamed_watch(sandbox, workdir):
    async def main() -> None:
        asb = await AsyncSandbox.connect(sandbox.sandbox_id)
        events: asyncio.Queue = asyncio.Queue()
        handle = await asb.files.watch_dir(workdir, on_event=events.put_nowait, include_entry=True)
        await asb.files.write(f"{workdir}/async.txt", "async data")

        async def chunks():
            for part in (b"streamed ", b"from an ", b"async iterable"):
                yield part

        await asb.files.write(f"{workdir}/aiter.txt", chunks())
        assert await asb.files.read(f"{workdir}/aiter.txt") == "streamed from an async iterable"
        many = await asb.files.write_files([{"path": f"{workdir}/m{i}.txt", "data": str(i)} for i in range(3)])
        assert [w.name for w in many] == ["m0.txt", "m1.txt", "m2.txt"]
        assert await asb.files.read(f"{workdir}/async.txt") == "async data"
        deadline = time.monotonic() + DEADLINE_S
        while True:
            event = await asyncio.wait_for(events.get(), max(deadline - time.monotonic(), 0.01))
            if (event.name, event.type) == ("async.txt", FilesystemEventType.WRITE):
                assert event.entry is not None and event.entry.path == f"{workdir}/async.txt"
                break
        await handle.stop()
        listed = await asb.files.list(workdir)
        assert f"{workdir}/async.txt" in {e.path for e in listed}
        assert await asb.files.exists(f"{workdir}/async.txt")
        stream = await asb.files.read(f"{workdir}/async.txt", format="stream")
        assert b"".join([chunk async for chunk in stream]) == b"async data"
        await asb.files.remove(f"{workdir}/async.txt")
        assert not await asb.files.exists(f"{workdir}/async.txt")

    asyncio.run(main())


# -- hostile paths and bodies -------------------------------------------------------------------------------------
def test_traversal_resolves_inside_the_sandbox_or_is_refused(sandbox, workdir, tmp_path: Path):
    host_secret = tmp_path / f"host-secret-{uuid.uuid4().hex[:6]}"
    host_secret.mkdir()
    (host_secret / "secret.txt").write_text("host only")
    # `..` that stays below the root resolves inside the sandbox: its own /etc/hostname, not the host's
    inside = sandbox.files.read("/home/user/../../etc/hostname")
    assert inside == sandbox.commands.run("cat /etc/hostname").stdout
    # `..` that climbs above the root is refused with the SDK's InvalidArgument (HTTP 400 / Connect invalid_argument)
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read("../../../../../../etc/passwd")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.write("/../../../" + str(host_secret / "planted.txt"), "x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list("/../..")
    # a symlink to a host path resolves in the sandbox's root, where that path does not exist
    sandbox.commands.run(f"ln -s {host_secret} {workdir}/escape", user="root")
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"{workdir}/escape/secret.txt")
    with pytest.raises(SandboxException):
        sandbox.files.write(f"{workdir}/escape/planted.txt", "x")
    sandbox.files.remove(f"{workdir}/escape")  # removes the link, never what it names
    assert sorted(p.name for p in host_secret.iterdir()) == ["secret.txt"]
    assert (host_secret / "secret.txt").read_text() == "host only"


def test_oversized_upload_is_413_and_bad_bodies_are_4xx(sandbox, dsec_http, workdir):
    url = urlparse(dsec_http.http_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=DEADLINE_S)
    conn.putrequest("POST", f"/files?path={workdir}/huge.bin")
    for key, value in _envd_headers(sandbox.sandbox_id, sandbox._envd_access_token).items():
        conn.putheader(key, value)
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(64 << 30))  # announced, never sent: refused before any byte is read
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413, response.read()
    conn.close()
    with _envd(dsec_http, sandbox.sandbox_id, sandbox._envd_access_token) as envd:
        bad_gzip = envd.post(
            "/files", params={"path": f"{workdir}/g.bin"}, content=b"not gzip at all",
            headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
        )  # fmt: skip
        assert bad_gzip.status_code == 400 and "gzip" in bad_gzip.json()["message"]
        no_path = envd.post("/files", content=b"x", headers={"Content-Type": "application/octet-stream"})
        assert no_path.status_code == 400
        no_part = envd.post("/files", data={"field": "value"}, files={})
        assert no_part.status_code in (400, 415)
        bad_multipart = envd.post("/files", content=b"--x\r\ngarbage", headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert 400 <= bad_multipart.status_code < 500
        truncated = envd.post(
            "/files", content=b'--b\r\nContent-Disposition: form-data; name="file"; filename="' + workdir.encode()
            + b'/cut.txt"\r\n\r\npartial', headers={"Content-Type": "multipart/form-data; boundary=b"},
        )  # fmt: skip
        assert truncated.status_code == 400, truncated.text
        mixed = envd.post("/files", data={"note": "ignored"}, files={"file": (f"{workdir}/mixed.txt", b"m")})
        assert mixed.status_code == 200 and [w["path"] for w in mixed.json()] == [f"{workdir}/mixed.txt"]
        assert envd.put("/files").status_code == 405
        assert envd.get("/no-such-envd-route").status_code == 404
        gz = envd.post(
            "/files", params={"path": f"{workdir}/ok.gz.txt"}, content=gzip.compress(b"zipped"),
            headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
        )  # fmt: skip
        assert gz.status_code == 200 and gz.json()[0]["path"] == f"{workdir}/ok.gz.txt"
    assert sandbox.files.read(f"{workdir}/ok.gz.txt") == "zipped"  # the server still serves


def test_disk_full_is_507(dsec_http):
    """A write that fills the sandbox's disk (disk_mb) answers 507, which the SDK maps to NotEnoughSpace."""
    client = dsec.Client(dsec_http.grpc_address)
    try:
        with client.create(image="base", disk_mb=16, timeout_s=300) as sb:
            headers = {**_envd_headers(sb.id), "X-API-Key": dsec_http.api_key, "Content-Type": "application/octet-stream"}
            with httpx.Client(base_url=dsec_http.http_url, headers=headers, timeout=DEADLINE_S) as envd:
                full = envd.post("/files", params={"path": "/tmp/fill.bin"}, content=b"\0" * (64 << 20))
                assert full.status_code == 507, full.text
                sb.files.remove("/tmp/fill.bin", missing_ok=True)  # what was written before the disk filled up
                assert envd.post("/files", params={"path": "/tmp/small.txt"}, content=b"fits").status_code == 200
    finally:
        client.close()

def test_health_and_unknown_sandbox(sandbox, dsec_http):
    with _envd(dsec_http, sandbox.sandbox_id, sandbox._envd_access_token) as envd:
        assert envd.get("/health").status_code == 204
    with _envd(dsec_http, "sb-does-not-exist") as envd:
        gone = envd.get("/health")
        assert gone.status_code == 502 and "was not found" in gone.json()["message"]
        assert envd.get("/files", params={"path": "/etc/hostname"}).status_code == 502


# -- dsec's own SDK over the same FilesystemService, directly and through a gateway --------------------------------
@pytest.mark.parametrize("through_gateway", [False, True], ids=["direct", "gateway"])
def test_dsec_sdk_filesystem_ops(dsec_http, through_gateway):
    running = None
    address = dsec_http.grpc_address
    if through_gateway:
        gateway = Gateway()
        gateway.add_node("node-0", dsec_http.grpc_address, Capacity(cpus=8, memory_mb=8192, sandboxes=64))
        running = serve_gateway(gateway, probe_interval_s=0.5)
        address = running.address
    client = dsec.Client(address)
    try:
        with client.create(image="base", timeout_s=300) as sb:
            assert sb.files.make_dir("/work/a/b", user="user") is True
            assert sb.files.make_dir("/work/a/b") is False
            sb.files.write("/work/a/b/f.txt", "data")
            info = sb.files.stat("/work/a/b")
            assert (info.type, info.owner) == ("dir", "user")
            tree = {e.path for e in sb.files.list_tree("/work", depth=3)}
            assert tree == {"/work/a", "/work/a/b", "/work/a/b/f.txt"}
            with sb.files.watch("/work", recursive=True) as watch:
                moved = sb.files.rename("/work/a/b/f.txt", "/work/g.txt")
                assert moved.path == "/work/g.txt"
                changes = set()
                deadline = time.monotonic() + DEADLINE_S
                while ("create", "g.txt") not in changes:
                    change = watch.get(timeout=max(deadline - time.monotonic(), 0.01))
                    changes.add((change.kind, change.name))
                assert ("rename", "a/b/f.txt") in changes
            assert sb.files.remove("/work/a") is True
            assert sb.files.remove("/work/a", missing_ok=True) is False
            with pytest.raises(FileNotFoundInSandbox):
                sb.files.remove("/work/a")
            assert not sb.files.exists("/work/a") and sb.files.exists("/work/g.txt")
    finally:
        client.close()
        if running is not None:
            running.stop()


def test_files_on_a_microvm(dsec_http, e2b_env):
    """The same envd files API on a QEMU microVM (busybox: no user `user`, so root owns what is written)."""
    sb = Sandbox.create("busybox", timeout=300, metadata={"suite": "files", "dsec.substrate": "microvm"})
    try:
        handle = sb.files.watch_dir("/tmp")
        info = sb.files.write("/tmp/vm/file.txt", "in a vm")
        assert info.path == "/tmp/vm/file.txt"
        assert sb.files.read("/tmp/vm/file.txt") == "in a vm"
        assert sb.files.get_info("/tmp/vm/file.txt").owner == "root"
        assert {e.path for e in sb.files.list("/tmp", depth=2)} >= {"/tmp/vm", "/tmp/vm/file.txt"}
        _poll_until(handle, {("vm", FilesystemEventType.CREATE)})
        sb.files.rename("/tmp/vm/file.txt", "/tmp/moved.txt")
        _poll_until(handle, {("moved.txt", FilesystemEventType.CREATE)})
        handle.stop()
        sb.files.remove("/tmp/vm")
        assert not sb.files.exists("/tmp/vm")
        with pytest.raises(InvalidArgumentException):
            sb.files.read("/../../etc/passwd/../../..")
    finally:
        sb.kill()



def test_open_watches_are_capped_and_freed(dsec_http):
    """Each open watch holds a server RPC thread, so a server keeps at most workers/4 open: one more is
    CapacityExceeded (RESOURCE_EXHAUSTED), and stopping one frees its slot."""
    from dsec.errors import CapacityExceeded

    client = dsec.Client(dsec_http.grpc_address)
    watches = []
    try:
        with client.create(image="base", timeout_s=300) as sb:
            with pytest.raises(CapacityExceeded):
                for _ in range(200):  # other tests' watches may hold slots too: open until refused
                    watches.append(sb.files.watch("/tmp"))
            assert watches, "not even one watch could be opened"
            watches.pop().stop()
            deadline = time.monotonic() + DEADLINE_S
            while True:  # the stopped watch's slot is released once the server sees the cancel
                try:
                    watches.append(sb.files.watch("/tmp"))
                    break
                except CapacityExceeded:
                    assert time.monotonic() < deadline, "a stopped watch never released its slot"
                    time.sleep(0.05)
    finally:
        for watch in watches:
            watch.stop()
        client.close()


def test_watches_end_with_their_sandbox(dsec_http, e2b_env):
    """Destroying a sandbox ends its watches at once: dsec's stream reports the loss, the door's polling watcher
    answers an error, and neither hangs nor keeps a server watch slot."""
    client = dsec.Client(dsec_http.grpc_address)
    try:
        sb = client.create(image="base", timeout_s=300)
        watch = sb.files.watch("/tmp")
        e2b_sb = Sandbox.connect(sb.id)
        handle = e2b_sb.files.watch_dir("/tmp")
        sb.destroy()
        deadline = time.monotonic() + DEADLINE_S
        with pytest.raises(DsecError):
            while watch.get(timeout=max(deadline - time.monotonic(), 0.01)) is not None:
                pass
        with pytest.raises(SandboxException):
            while time.monotonic() < deadline:
                handle.get_new_events()
                time.sleep(0.05)
    finally:
        client.close()


def test_files_respect_tenants_when_auth_is_on():
    """With a tokens file, envd file calls run as the caller's tenant: another tenant's key sees no sandbox."""
    root = Path(tempfile.mkdtemp(prefix="dcf-", dir="/tmp"))
    tokens = root / "tokens.yaml"
    tokens.write_text("tok-alice-files-0123: alice\ntok-bob-files-0123: bob\n")
    running = start_dsec_http(root, ["--tokens-file", str(tokens)], api_key="tok-alice-files-0123")
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in running.env.items():
                patch.setenv(key, value)
            sb = Sandbox.create("base", timeout=300)
            try:
                sb.files.write("/tmp/alice.txt", "alice's")
                assert sb.files.read("/tmp/alice.txt") == "alice's"
                headers = _envd_headers(sb.sandbox_id, sb._envd_access_token)
                with httpx.Client(base_url=running.http_url, headers=headers, timeout=DEADLINE_S) as envd:
                    as_bob = envd.get("/files", params={"path": "/tmp/alice.txt"}, headers={"X-API-Key": "tok-bob-files-0123"})
                    assert as_bob.status_code == 502 and "was not found" in as_bob.json()["message"]
                    bob_stat = envd.post(
                        "/filesystem.Filesystem/Stat", json={"path": "/tmp/alice.txt"},
                        headers={"X-API-Key": "tok-bob-files-0123", "Content-Type": "application/json"},
                    )  # fmt: skip
                    assert bob_stat.status_code == 503 and bob_stat.json()["code"] == "unavailable"
                    wrong = envd.get("/files", params={"path": "/tmp/alice.txt"}, headers={"X-API-Key": "tok-nobody"})
                    assert wrong.status_code == 401
            finally:
                sb.kill()
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)

# -- fuzz: envd's file routes and Connect endpoints never answer 5xx or a traceback ------------------------------
FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
PATHS = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "/", "..", "../../..", "/etc/../../x", "~", "~/..", "/proc/self/root", "a\x00b", "//x//y/"]),
    st.text(min_size=4097, max_size=4200),
)
UNARY = ["Stat", "MakeDir", "Move", "ListDir", "Remove", "CreateWatcher", "GetWatcherEvents", "RemoveWatcher"]


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST"]), path=PATHS, user=st.one_of(st.just(""), st.text(max_size=12)),
    body=st.binary(max_size=300), content_type=st.sampled_from(["application/octet-stream", "multipart/form-data; boundary=b", "text/plain", ""]),
    gzip_body=st.booleans(),
)  # fmt: skip
def test_fuzz_files_route_never_5xx(fuzz_envd, method, path, user, body, content_type, gzip_body):
    params = {"path": path, **({"username": user} if user else {})}
    headers = {"Content-Type": content_type, **({"Content-Encoding": "gzip"} if gzip_body else {})}
    response = fuzz_envd.request(method, "/files", params=params, content=body if method == "POST" else None, headers=headers)
    assert response.status_code < 500, f"{method} {params} {headers} {body[:60]!r} → {response.status_code} {response.text[:300]}"
    assert "Traceback" not in response.text


@FUZZ
@given(endpoint=st.sampled_from(UNARY), body=st.one_of(st.binary(max_size=200), st.builds(lambda p: p.encode(), PATHS)),
       as_json=st.booleans())  # fmt: skip
def test_fuzz_connect_filesystem_never_5xx(fuzz_envd, endpoint, body, as_json):
    if as_json:
        body = b'{"path": ' + json.dumps(body.decode("utf-8", "replace")).encode() + b', "depth": 3}'
    content_type = "application/json" if as_json else "application/proto"
    response = fuzz_envd.post(f"/filesystem.Filesystem/{endpoint}", content=body, headers={"Content-Type": content_type})
    assert response.status_code < 500, f"{endpoint} {body[:80]!r} → {response.status_code} {response.text[:300]}"
    assert "Traceback" not in response.text


@pytest.fixture(scope="module")
def fuzz_sandbox(dsec_http):
    with pytest.MonkeyPatch.context() as patch:
        for key, value in dsec_http.env.items():
            patch.setenv(key, value)
        sb = Sandbox.create("base", timeout=600, metadata={"suite": "files-fuzz"})
        try:
            yield sb
        finally:
            sb.kill()


@pytest.fixture(scope="module")
def fuzz_envd(dsec_http, fuzz_sandbox):
    with _envd(dsec_http, fuzz_sandbox.sandbox_id, fuzz_sandbox._envd_access_token) as client:
        yield client
    assert fuzz_sandbox.files.exists("/etc/hostname")  # the sandbox survived the fuzz
