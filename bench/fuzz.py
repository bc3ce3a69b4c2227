"""Long fuzzing run: the gRPC API, the agent's wire protocol from the host side, and the image importers.

  importers  coverage-guided (atheris, libFuzzer): `import_docker_archive` and `import_oci_layout` run in-process
             on mutated archives, starting from valid seed images; anything but a typed `DsecError` is a crash,
             an input running over --case-timeout a hang (libFuzzer's -timeout). A crash is kept as a reproducer
             file and the fuzzer restarts on the same corpus for the time left.
  agent-client  coverage-guided (atheris): the host side's parser of what an agent sends back. A sandbox's root
             can reach its agent's socket directory, so replies are untrusted input: arbitrary bytes arrive as the
             answer to a ping, spawn (then its output events), read_file, list_dir or stat over a pipe pair; the
             client must return or raise a typed `DsecError`, never another exception and never wait forever.
  api        Hypothesis (generation, not coverage: the server is another process) over every SandboxService
             request type with the descriptor-built strategies of tests/fuzz, aimed half the time at a live
             busybox sandbox; a crash is an untyped or INTERNAL status or a server that stops answering, a hang an
             RPC that does not answer within --case-timeout.
  agent      Hypothesis frames (valid types with random payloads, unknown types, lying length fields, raw bytes)
             written to the agent of a live crun sandbox over its unix socket, one connection per case; a crash
             is an agent that stops answering PING, a hang a connection that neither answers nor closes.

Run: `.venv/bin/python -m bench.fuzz [--seconds 600] [--targets importers,agent-client,api,agent]`; the time is
split evenly among the targets. The last line is `crashes=N hangs=N cases=N` (and per-target counts before it).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import progress, report

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DSEC_HOME", "/var/lib/dsec")

TARGETS = ("importers", "agent-client", "api", "agent")
IMPORTERS = ("docker", "oci")
INPROCESS = (*IMPORTERS, "agent-client")  # atheris targets, each in a child process


say = functools.partial(progress, "fuzz")


@dataclass
class Tally:
    cases: int = 0
    crashes: int = 0
    hangs: int = 0
    findings: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.cases += other.cases
        self.crashes += other.crashes
        self.hangs += other.hangs
        self.findings += other.findings


# -- seed images ---------------------------------------------------------------------------------------------
def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
            elif name.startswith("link:"):
                info.name, info.type, info.linkname = name[5:], tarfile.SYMTYPE, data.decode()
                archive.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def seed_images() -> dict[str, list[bytes]]:
    """Small valid images in both formats (plain and gzip layers, a whiteout, a symlink): the fuzzer's start."""
    layers = [
        _tar([("etc/", b""), ("etc/hello", b"hello\n"), ("link:etc/self", b"hello")]),
        _tar([("etc/.wh.hello", b""), ("bin/", b""), ("bin/tool", b"#!/bin/sh\necho hi\n")]),
    ]
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [_sha(layer) for layer in layers]},
    }).encode()  # fmt: skip
    docker = _tar([
        ("manifest.json", json.dumps([
            {"Config": "config.json", "RepoTags": ["fuzz:1"], "Layers": ["0/layer.tar", "1/layer.tar"]},
        ]).encode()),
        ("config.json", config), ("0/layer.tar", layers[0]), ("1/layer.tar", layers[1]),
    ])  # fmt: skip
    blobs = {_sha(config): config}
    layer_descs = []
    for index, layer in enumerate(layers):
        blob = gzip.compress(layer, mtime=0) if index == 1 else layer
        blobs[_sha(blob)] = blob
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if index == 1 else "")
        layer_descs.append({"mediaType": media, "digest": _sha(blob), "size": len(blob)})
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json", "digest": _sha(config), "size": len(config),
        },
        "layers": layer_descs,
    }).encode()  # fmt: skip
    blobs[_sha(manifest)] = manifest
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _sha(manifest),
                       "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "1"}}],
    }).encode()  # fmt: skip
    oci = _tar([("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", index)]
               + [(f"blobs/sha256/{d.split(':')[1]}", b) for d, b in blobs.items()])
    return {"docker": [docker], "oci": [oci]}


# -- importers (atheris, in a child process per run) ---------------------------------------------------------
def importer_child(kind: str, corpus: Path, seconds: int, case_timeout: int, artifacts: Path) -> None:
    """Runs inside a child: libFuzzer owns the process and exits it when the time is up or on a crash."""
    import atheris

    with atheris.instrument_imports(include=["dsec"]):
        from dsec.errors import DsecError
        from dsec.images.importers import import_docker_archive, import_oci_layout
        from dsec.images.store import LayerStore

    work = artifacts.parent / f"work-{kind}"  # under the parent's workdir, which it removes (libFuzzer exits us)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    counter = [0]

    def one(data: bytes) -> None:
        counter[0] += 1
        if counter[0] % 500 == 0:  # imported layers accumulate: start from an empty store now and then
            shutil.rmtree(work / "store", ignore_errors=True)
        store = LayerStore(work / "store", layer_format="dir")
        archive = work / "input.tar"
        archive.write_bytes(data)
        try:
            if kind == "docker":
                import_docker_archive(store, archive, None)
            else:
                layout = work / "layout"
                shutil.rmtree(layout, ignore_errors=True)
                layout.mkdir()
                try:
                    with tarfile.open(archive) as tar:  # the harness unpacks: the importer reads a directory
                        tar.extractall(layout, filter="data")
                except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeError):
                    return  # not a tar the harness can unpack: no importer input
                import_oci_layout(store, layout, None)
        except DsecError:
            pass

    atheris.Setup(
        [sys.argv[0], str(corpus), f"-max_total_time={seconds}", f"-timeout={case_timeout}", "-rss_limit_mb=4096",
         f"-artifact_prefix={artifacts}/{kind}-", "-print_final_stats=1"],
        one,
    )  # fmt: skip
    atheris.Fuzz()


def _agent_client_seeds() -> list[bytes]:
    """Well-formed replies to request id 1 for each operation the harness picks with the first byte."""
    def frame(ftype: int, payload: bytes, rid: int = 1) -> bytes:
        return HEADER.pack(ftype, rid, len(payload)) + payload

    entry = b"x\0file\0" + b"5\0" + b"644\0" + b"1700000000.5\0"
    return [
        bytes([0]) + frame(0xA0, b"alive"),
        bytes([1]) + frame(0x84, b"42\0") + frame(0x81, b"out") + frame(0x82, b"err") + frame(0x83, b"0\x000\x00"),
        bytes([2]) + frame(0x85, b"data") + frame(0x86, b""),
        bytes([3]) + frame(0x87, entry) + frame(0x86, b""),
        bytes([4]) + frame(0x87, entry),
        bytes([1]) + frame(0x8F, b"2\0No such file\0"),
    ]


def agent_client_child(corpus: Path, seconds: int, case_timeout: int, artifacts: Path) -> None:
    """The host-side agent client fed arbitrary reply bytes (libFuzzer owns this process)."""
    import threading

    import atheris

    with atheris.instrument_imports(include=["dsec.agent"]):
        from dsec.agent.client import AgentClient
        from dsec.errors import DsecError

    operations = [
        lambda c: c.ping(timeout=case_timeout),
        lambda c: list(c.spawn(["true"]).events()),
        lambda c: b"".join(c.read_file("/x")),
        lambda c: c.list_dir("/"),
        lambda c: c.stat("/x"),
        lambda c: c.list_dir_info("/"),
        lambda c: c.stat_info("/x"),
    ]

    def one(data: bytes) -> None:
        if not data:
            return
        operation = operations[data[0] % len(operations)]
        to_client_r, to_client_w = os.pipe()
        from_client_r, from_client_w = os.pipe()
        client = AgentClient.from_fds(to_client_r, from_client_w)
        outcome: list[BaseException | None] = []

        def call() -> None:
            try:
                operation(client)
                outcome.append(None)
            except DsecError:
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - reported to the fuzzer below
                outcome.append(exc)

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        os.read(from_client_r, 65536)  # the request is on the wire: its id is pending, replies will land
        if len(data) > 1:
            os.write(to_client_w, data[1:])
        os.close(to_client_w)  # then the agent "goes away": every waiter must be woken
        worker.join(case_timeout)
        client.close()
        os.close(from_client_r)
        if worker.is_alive():
            raise TimeoutError(f"the client still waits {case_timeout}s after the agent closed the stream")
        if outcome and outcome[0] is not None:
            raise outcome[0]

    atheris.Setup(
        [sys.argv[0], str(corpus), f"-max_total_time={seconds}", f"-timeout={case_timeout + 5}", "-rss_limit_mb=4096",
         f"-artifact_prefix={artifacts}/agent-client-", "-print_final_stats=1"],
        one,
    )  # fmt: skip
    atheris.Fuzz()


_DONE = re.compile(r"Done (\d+) runs in")
_PROGRESS = re.compile(r"^#(\d+)\s", re.M)


def fuzz_in_process(kind: str, seconds: float, case_timeout: int, workdir: Path) -> Tally:
    """Run the atheris target `kind` in child processes for `seconds`, restarting after each crash or hang."""
    corpus, artifacts = workdir / f"corpus-{kind}", workdir / "artifacts"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    seeds = _agent_client_seeds() if kind == "agent-client" else seed_images()[kind]
    for index, seed in enumerate(seeds):
        (corpus / f"seed-{index}").write_bytes(seed)
    tally = Tally()
    deadline = time.monotonic() + seconds
    while (left := int(deadline - time.monotonic())) >= 2:
        child = subprocess.run(
            [sys.executable, "-m", "bench.fuzz", "--child", kind, "--corpus", str(corpus), "--seconds", str(left),
             "--case-timeout", str(case_timeout), "--artifacts", str(artifacts)],
            capture_output=True, text=True, timeout=left + 120, cwd=REPO,
        )  # fmt: skip
        log = child.stderr + child.stdout  # libFuzzer reports on stderr, atheris prints the Python traceback
        done = _DONE.search(log)
        progress = _PROGRESS.findall(log)
        tally.cases += int(done.group(1)) if done else int(progress[-1]) if progress else 0
        if child.returncode == 0 and done:
            continue  # ran its time out
        markers = ("ERROR: libFuzzer", "Uncaught Python exception")
        finding = next((line for line in log.splitlines() if any(m in line for m in markers)), "")
        artifact = next(iter(re.findall(r"Test unit written to (\S+)", log)), "")
        if "timeout" in finding:
            tally.hangs += 1
        else:
            tally.crashes += 1
        tally.findings.append(f"{kind}: {finding or f'exit {child.returncode}'} {artifact}\n{log[-3000:]}")
    return tally


# -- gRPC API (hypothesis against a live server) --------------------------------------------------------------
def fuzz_api(seconds: float, case_timeout: float) -> Tally:
    import grpc
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from dsec.errors import ERROR_METADATA_KEY, error_class
    from dsec.sdk.embedded import EmbeddedServer
    from dsec.v1 import sandbox_pb2 as pb
    from dsec.v1 import sandbox_pb2_grpc as pb_grpc
    from tests.fuzz.strategies import messages

    unary = {"Create": pb.CreateRequest, "Get": pb.SandboxRef, "List": pb.ListRequest, "Destroy": pb.SandboxRef,
             "SetTimeout": pb.SetTimeoutRequest, "StartSession": pb.StartSessionRequest, "CloseSession": pb.SessionRef,
             "ListDir": pb.FileRequest, "Call": pb.CallRequest, "Pause": pb.SandboxRef, "Resume": pb.SandboxRef,
             "Snapshot": pb.SnapshotRequest, "Restore": pb.RestoreRequest, "Fork": pb.ForkRequest}  # fmt: skip
    streams = {"Exec": pb.ExecRequest, "RunInSession": pb.RunInSessionRequest, "ReadFile": pb.FileRequest,
               "Download": pb.FileRequest}
    uploads = {"WriteFile": pb.WriteFileRequest, "Upload": pb.UploadRequest}
    tally = Tally()
    server = EmbeddedServer.start(Path(os.environ["DSEC_HOME"]))
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 128 << 20)])
    stub = pb_grpc.SandboxServiceStub(channel)
    live = stub.Create(pb.CreateRequest(spec=pb.SandboxSpec(image="busybox", substrate="container")), timeout=300).id
    keep = {live}

    def judge(method: str, exc: grpc.RpcError) -> None:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            tally.hangs += 1
            tally.findings.append(f"api {method}: no answer in {case_timeout:.0f}s")
            return
        name = dict(exc.trailing_metadata() or ()).get(ERROR_METADATA_KEY, "")
        untyped = not name or error_class(name) is None
        if (untyped and "deserializ" not in (exc.details() or "").lower()) or exc.code() == grpc.StatusCode.INTERNAL:
            tally.crashes += 1
            tally.findings.append(f"api {method}: {exc.code().name} {name or 'untyped'}: {(exc.details() or '')[:300]}")

    def cleanup(response) -> None:
        if isinstance(response, pb.ForkResponse):
            infos = list(response.sandboxes)
        else:
            infos = [response] if isinstance(response, pb.SandboxInfo) else []
        for info in infos:
            if info.id and info.id not in keep:
                try:
                    stub.Destroy(pb.SandboxRef(sandbox_id=info.id), timeout=120)
                except grpc.RpcError as exc:
                    judge("Destroy", exc)

    def aim(request, at_live: bool):
        if at_live and hasattr(request, "sandbox_id"):
            request.sandbox_id = live
        if isinstance(request, pb.SetTimeoutRequest):
            if at_live:
                request.timeout_s = 3600.0  # the live sandbox's lifetime; other values go to other ids
        elif hasattr(request, "timeout_s"):  # an exec's deadline: bounded, so a fuzzed command cannot run long
            request.timeout_s = min(max(request.timeout_s, 0.0), 5.0) if request.timeout_s == request.timeout_s else 5.0
        if isinstance(request, pb.ExecRequest):
            request.ClearField("step")
        return request

    def ensure_live(sandbox_id: str) -> str:
        """A fuzzed Pause, SetTimeout or Destroy may have hit the live sandbox: resume it or make a new one."""
        try:
            state = stub.Get(pb.SandboxRef(sandbox_id=sandbox_id), timeout=case_timeout).state
            if state == "paused":
                stub.Resume(pb.SandboxRef(sandbox_id=sandbox_id), timeout=case_timeout)
            if state in ("running", "paused"):
                stub.SetTimeout(pb.SetTimeoutRequest(sandbox_id=sandbox_id, timeout_s=3600), timeout=case_timeout)
                return sandbox_id
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                judge("Get", exc)
        spec = pb.SandboxSpec(image="busybox", substrate="container")
        fresh = stub.Create(pb.CreateRequest(spec=spec), timeout=300).id
        keep.add(fresh)
        return fresh

    def check_alive() -> None:
        try:
            stub.List(pb.ListRequest(), timeout=case_timeout)
        except grpc.RpcError as exc:
            tally.crashes += 1
            tally.findings.append(f"api: the server stopped answering: {exc.code().name}")
            raise SystemExit("the server under fuzz died; see the findings") from exc

    chunk = settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    deadline = time.monotonic() + seconds
    methods = sorted(unary) + sorted(streams) + sorted(uploads)
    round_number = 0
    try:
        while time.monotonic() < deadline:
            method = methods[round_number % len(methods)]
            round_number += 1
            if method in uploads:
                strategy = st.lists(messages(uploads[method]), max_size=4)
            else:
                strategy = messages({**unary, **streams}[method])

            @chunk
            @given(request=strategy, at_live=st.booleans())
            def run(request, at_live) -> None:
                if time.monotonic() > deadline:
                    return
                tally.cases += 1
                try:
                    if method in uploads:
                        stub_method = getattr(stub, method)
                        stub_method(iter([aim(r, at_live) for r in request]), timeout=case_timeout)
                    elif method in streams:
                        list(getattr(stub, method)(aim(request, at_live), timeout=case_timeout))
                    else:
                        if method == "Destroy" and at_live:
                            return  # the live sandbox is the target of the rest
                        cleanup(getattr(stub, method)(aim(request, at_live), timeout=case_timeout))
                except grpc.RpcError as exc:
                    judge(method, exc)

            run()
            check_alive()
            live = ensure_live(live)
    finally:
        try:
            stub.Destroy(pb.SandboxRef(sandbox_id=live), timeout=120)
        except grpc.RpcError:
            pass
        channel.close()
        server.stop()
    return tally


# -- the agent's wire protocol, host side (hypothesis frames into a live sandbox's agent) -----------------------
HEADER = struct.Struct(">BII")
FRAME_TYPES = [0x01, 0x02, 0x03, 0x04, 0x05, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x20]


def _frame(ftype: int, rid: int, payload: bytes, length: int | None = None) -> bytes:
    return HEADER.pack(ftype, rid, len(payload) if length is None else length) + payload


def _agent_socket(sandbox_id: str) -> Path:
    from dsec.server.orphans import registered_dir

    state_dir = registered_dir(sandbox_id)
    found = sorted(state_dir.rglob("agent.sock")) if state_dir is not None else []
    if not found:
        raise SystemExit(f"no agent socket under the state dir of {sandbox_id}")
    return found[0]


def _connect(path: Path, timeout: float) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)  # state paths can be longer than sun_path
    try:
        conn.connect(f"/proc/self/fd/{dir_fd}/{path.name}")
    finally:
        os.close(dir_fd)
    return conn


def _ping(path: Path, timeout: float) -> bool:
    try:
        with _connect(path, timeout) as conn:
            conn.sendall(_frame(0x20, 7, b"alive"))
            reply = b""
            while len(reply) < HEADER.size + 5:
                data = conn.recv(4096)
                if not data:
                    return False
                reply += data
            return reply[0] == 0xA0 and reply[HEADER.size:HEADER.size + 5] == b"alive"
    except OSError:
        return False


def fuzz_agent(seconds: float, case_timeout: float) -> Tally:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import dsec

    keys = st.sampled_from(["arg", "env", "cwd", "stdin", "uid", "gid", "pty_cols", "pty_rows", "group", "pid", "x"])
    values = st.one_of(
        st.sampled_from(["true", "/bin/true", "sh", "-c", "exit 3", "/", "..", "/etc/passwd", "/nonexistent", "0", "1",
                         "-1", "65536", "99999999999", "9", "PATH=/bin", "", "0644", "/tmp/f", "echo x"]),
        st.text(max_size=40).map(lambda s: s.replace("\0", "")),
    )  # fmt: skip
    fields = st.lists(st.one_of(keys, values), max_size=12).map(
        lambda items: b"".join(i.encode() + b"\0" for i in items)
    )
    payloads = st.one_of(fields, st.binary(max_size=300))
    frames = st.builds(
        lambda t, rid, payload, lie: _frame(t, rid, payload, None if lie is None else lie),
        st.one_of(st.sampled_from(FRAME_TYPES), st.integers(0, 255)),
        st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1)),
        payloads,
        st.one_of(st.none(), st.integers(0, 2**32 - 1), st.just((1 << 20) + 1)),
    )
    streams = st.one_of(st.lists(frames, min_size=1, max_size=6).map(b"".join), st.binary(min_size=1, max_size=512))
    tally = Tally()
    client = dsec.Client()  # an embedded server of its own
    sandbox = client.create("busybox", memory_mb=128, pids=64, timeout_s=int(seconds) + 600)
    path = _agent_socket(sandbox.id)
    deadline = time.monotonic() + seconds

    def one(data: bytes) -> None:
        """Send, half-close, read until the agent closes its side (it must, at our EOF); then it must answer PING."""
        tally.cases += 1
        with _connect(path, case_timeout) as conn:
            try:
                conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):
                    pass
            except (TimeoutError, socket.timeout):
                tally.hangs += 1
                tally.findings.append(
                    f"agent: connection neither answered nor closed in {case_timeout:.0f}s: {data[:200]!r}"
                )
            except (BrokenPipeError, ConnectionResetError):
                pass  # the agent closed first (an oversized frame ends the stream)
        if not _ping(path, case_timeout):
            tally.hangs += 1
            tally.findings.append(f"agent: no PONG within {case_timeout:.0f}s after {data[:200]!r}")
            raise SystemExit("the agent under fuzz stopped answering; see the findings")

    chunk = settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    try:
        while time.monotonic() < deadline:
            @chunk
            @given(data=streams)
            def run(data: bytes) -> None:
                if time.monotonic() < deadline:
                    one(data)

            run()
            state = sandbox.refresh().state
            if state != "running":
                tally.crashes += 1
                tally.findings.append(f"agent: the sandbox is {state} after fuzzing")
                break
    finally:
        sandbox.destroy()
        client.close()
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="total fuzzing time, split among the targets")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--case-timeout", type=int, default=30, help="seconds one input may take before it is a hang")
    parser.add_argument("--child", choices=INPROCESS, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "agent-client":
        agent_client_child(args.corpus, int(args.seconds), args.case_timeout, args.artifacts)
        return 0
    if args.child:
        importer_child(args.child, args.corpus, int(args.seconds), args.case_timeout, args.artifacts)
        return 0
    targets = [t for t in args.targets.split(",") if t]
    if unknown := sorted(set(targets) - set(TARGETS)):
        parser.error(f"unknown targets {unknown}; choose from {','.join(TARGETS)}")
    share = args.seconds / len(targets)
    total = Tally()
    workdir = Path(tempfile.mkdtemp(prefix="dsec-fuzz-"))
    figures: dict[str, int] = {}
    try:
        for target in targets:
            say(f"{target}: {share:.0f} s")
            if target == "importers":
                tally = Tally()
                for kind in IMPORTERS:
                    tally.add(fuzz_in_process(kind, share / len(IMPORTERS), args.case_timeout, workdir))
            elif target == "agent-client":
                tally = fuzz_in_process("agent-client", share, args.case_timeout, workdir)
            elif target == "api":
                tally = fuzz_api(share, args.case_timeout)
            else:
                tally = fuzz_agent(share, args.case_timeout)
            say(f"{target}: {tally.cases} cases, {tally.crashes} crashes, {tally.hangs} hangs")
            for finding in tally.findings[:5]:
                say(f"{target} finding: {finding}")
            figures[f"{target}_cases"] = tally.cases
            total.add(tally)
    finally:
        kept = list((workdir / "artifacts").glob("*")) if (workdir / "artifacts").is_dir() else []
        if kept:
            say(f"reproducers kept in {workdir / 'artifacts'}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report(figures)
    report({"crashes": total.crashes, "hangs": total.hangs, "cases": total.cases})
    return 0 if total.crashes == 0 and total.hangs == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
