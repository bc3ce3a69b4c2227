"""File, descriptor and exhaustion routes on every substrate, each judged on the host or in another sandbox.

- symlink races (TOCTOU) against the file API, upload and download while the sandbox swaps a directory for a
  symlink to the host's /tmp as fast as it can;
- writes through /proc/<pid>/fd and /proc/<pid>/root of another sandbox's process;
- file descriptors passed over the agent socket (SCM_RIGHTS) in both directions;
- inode exhaustion, huge argv/env: the host, the server and another sandbox stay responsive.
"""

from __future__ import annotations

import io
import secrets
import socket
import tarfile
import time
from pathlib import Path

import pytest

from dsec.errors import DsecError
from dsec.v1 import sandbox_pb2 as pb

from . import host
from .conftest import is_vm
from .table import not_applicable, record

pytestmark = pytest.mark.timeout(300)


def _sh(sandbox, script: str, timeout: float = 60) -> str:
    try:
        result = sandbox.exec(["/bin/sh", "-c", script], timeout=timeout)
    except DsecError as error:
        return f"{type(error).__name__}: {error.message}"
    return f"exit={result.exit_code} {result.stdout.decode(errors='replace')} {result.stderr.decode(errors='replace')}".strip()


def _one_file_tar(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


RACE_ROUNDS = 30


def test_symlink_race_in_file_api_upload_download(case, spawn, hostile_client, bait, tmp_path):
    secret, paths = bait
    token = secrets.token_hex(5)
    sandbox = spawn()
    # the racer swaps /race/x between a real directory and a symlink to the host's /tmp (as seen inside: its own)
    racer = (
        "mkdir -p /race; (i=0; while [ $i -lt 20000 ]; do rm -rf /race/x; mkdir /race/x; echo inner > /race/x/f; "
        "rm -rf /race/x; ln -s /tmp /race/x; i=$((i+1)); done) >/dev/null 2>&1 &"
    )
    sandbox.exec(["/bin/sh", "-c", racer])
    errors: dict[str, int] = {}
    leaked: list[str] = []
    downloads = tmp_path / "downloads"
    for index in range(RACE_ROUNDS):
        for name, action in (
            ("write", lambda: sandbox.files.write(f"/race/x/dsec-race-{token}-w", b"escaped")),
            ("read", lambda: sandbox.files.read(f"/race/x/{paths[0].name}")),
            ("list", lambda: [e.name for e in sandbox.files.list("/race/x")]),
            ("upload", lambda: hostile_client.client_stream(hostile_client.sandboxes.Upload, [
                pb.UploadRequest(header=pb.UploadHeader(sandbox_id=sandbox.id, path="/race/x")),
                pb.UploadRequest(data=_one_file_tar(f"dsec-race-{token}-u", b"escaped")),
            ])),  # fmt: skip
            ("download", lambda: sandbox.download("/race/x", downloads / str(index))),
        ):
            try:
                result = action()
            except (DsecError, tarfile.TarError, OSError) as error:
                errors[f"{name}:{type(error).__name__}"] = errors.get(f"{name}:{type(error).__name__}", 0) + 1
                continue
            if secret.encode() in repr(result).encode() or (name == "list" and paths[0].name in result):
                leaked.append(f"{name} saw the host bait")
    leaked += [str(p) for p in Path("/tmp").glob(f"dsec-race-{token}-*")]
    for found in downloads.rglob("*"):
        if found.is_file() and secret.encode() in found.read_bytes():
            leaked.append(f"download carried the host bait: {found}")
    leaked += [str(p) for p in tmp_path.iterdir() if p.name != "downloads"]  # nothing beside the download dir
    for path in Path("/tmp").glob(f"dsec-race-{token}-*"):
        path.unlink()
    outcome = ("LEAKED " + ", ".join(leaked)) if leaked else f"{RACE_ROUNDS}x5 calls; errors {dict(sorted(errors.items()))}"
    assert record(case[0], "symlink race (TOCTOU) in files/upload/download", outcome, not leaked)


def test_write_through_proc_fd_of_another_sandbox(case, spawn):
    if is_vm(case):
        not_applicable(case[0], "write via /proc/<pid>/fd of another sandbox", "n/a: a guest sees only its own kernel's processes")
        return
    token = secrets.token_hex(5)
    marker = str(7_000_000 + secrets.randbelow(1_000_000))
    victim, attacker = spawn(), spawn()
    victim.exec(["/bin/sh", "-c", f"(exec 3>>/victim-{token}; echo keep >&3; exec sleep {marker} 3>&3) >/dev/null 2>&1 &"])
    deadline = time.monotonic() + 20
    while not (pids := host.processes_with(f"sleep\0{marker}")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pids, "the victim's process never appeared on the host"
    host_pid = pids[0]
    script = (
        f"for p in {host_pid} $(ls /proc | grep '^[0-9]'); do for f in /proc/$p/fd/*; do "
        f"case $(readlink $f) in *victim*) echo pwned >> $f && echo WROTE-$f;; esac; done; done 2>/dev/null; "
        f"echo pwned >> /proc/{host_pid}/fd/3 2>/dev/null && echo WROTE-FD3; "
        f"echo pwned >> /proc/{host_pid}/root/victim-{token} 2>/dev/null && echo WROTE-ROOT; echo tried"
    )
    outcome = _sh(attacker, script)
    assert "tried" in outcome, f"the attack did not report: {outcome[-200:]}"
    content = victim.files.read(f"/victim-{token}")
    alive = bool(host.processes_with(f"sleep\0{marker}"))
    contained = content == b"keep\n" and alive
    state = "unchanged" if content == b"keep\n" else repr(content[:20])
    text = f"victim file {state}, process {'alive' if alive else 'GONE'}; {outcome[-40:]}"
    assert record(case[0], "write via /proc/<pid>/fd and /root of another sandbox", text, contained)


FD_PASS = """
import array, os, socket, struct, sys
token = sys.argv[1]
os.makedirs("/fdpass-" + token, exist_ok=True)
fd = os.open("/fdpass-" + token, os.O_RDONLY)
paths = [p for p in ("/.dsec/run/agent.sock",) if os.path.exists(p)]
if not paths:
    print("no agent socket visible")
for path in paths:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    ping = bytes([0x20]) + struct.pack(">II", 7, 4) + b"ping"
    s.sendmsg([ping], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd] * 8))])
    msg, ancillary, flags, _ = s.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
    received = sum(len(data) // 4 for level, kind, data in ancillary if kind == socket.SCM_RIGHTS)
    print(f"reply={msg[:1].hex()} fds_received={received}")
    spawn = b"".join(x + b"\\0" for x in (b"arg", b"/proc/self/fd", b"arg", b"x"))
    s.sendmsg([bytes([0x01]) + struct.pack(">II", 8, len(spawn)) + spawn],
              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    msg, ancillary, flags, _ = s.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
    received = sum(len(data) // 4 for level, kind, data in ancillary if kind == socket.SCM_RIGHTS)
    print(f"spawn_reply={msg[:1].hex()} fds_received={received}")
"""


def test_fd_passing_over_agent_socket(case, spawn, hostile_server):
    if is_vm(case):
        not_applicable(
            case[0], "fd passing over the agent socket", "n/a: a VM's agent channel is a virtio-serial byte stream: no fds"
        )
        return
    token = secrets.token_hex(5)
    sandbox = spawn(image_override="python")
    try:
        result = sandbox.exec(["python3", "-c", FD_PASS, token], timeout=30)
        outcome = f"exit={result.exit_code} {result.text.strip()} {result.stderr.decode(errors='replace')[-80:]}"
    except DsecError as error:
        outcome = f"{type(error).__name__}: {error.message}"
    assert "fds_received=" in outcome or "no agent socket" in outcome, f"the attack did not report: {outcome[-300:]}"
    in_server = host.fds_with(hostile_server.process.pid, f"fdpass-{token}")
    received = [int(part.split("=")[1]) for part in outcome.split() if part.startswith("fds_received=")]
    still_answers = sandbox.exec("echo alive").text.strip() == "alive"
    contained = not in_server and not any(received) and still_answers
    held = f"server holds {in_server}" if in_server else "server holds none"
    text = f"{held}; agent {'answers' if still_answers else 'DEAD'}; {outcome[-60:]}"
    assert record(case[0], "fd passing (SCM_RIGHTS) over the agent socket", text, contained)


def test_inode_exhaustion(case, spawn):
    sandbox = spawn(disk_mb=32)
    script = "mkdir -p /inodes && cd /inodes && seq 1 60000 | xargs touch 2>&1 | grep -m 1 -o 'No space left on device'; ls | wc -l"
    outcome = _sh(sandbox, script, timeout=240)
    words = outcome.split()
    made = int(words[-1]) if words and words[-1].isdigit() else -1
    bystander = spawn()
    other = _sh(bystander, "echo fresh > /probe && cat /probe")
    own = _sh(sandbox, "echo alive")
    enospc = "No space left on device" in outcome
    assert made >= 0, f"the attack did not report: {outcome[-200:]}"
    contained = enospc and 0 <= made < 60000 and "fresh" in other and "alive" in own
    text = (
        f"{made} files then {'ENOSPC' if enospc else 'no ENOSPC'}; other sandbox "
        f"{'writes' if 'fresh' in other else other[-30:]}; own {'answers' if 'alive' in own else own[-30:]}"
    )
    assert record(case[0], "inode exhaustion (disk=32 MB)", text, contained)


def test_huge_argv_and_env(case, spawn, hostile_client):
    sandbox = spawn()
    outcomes = []
    for name, attempt in (
        ("argv 3 MB", lambda: sandbox.exec(["echo", "a" * (3 << 20)], timeout=30)),
        ("argv 40k args", lambda: sandbox.exec(["echo", *(["ab"] * 40_000)], timeout=30)),
        ("env 3 MB", lambda: sandbox.exec("true", env={"BIG": "x" * (3 << 20)}, timeout=30)),
        ("command 70 MB", lambda: sandbox.exec("true " + "a" * (70 << 20), timeout=30)),
    ):
        try:
            result = attempt()
            outcomes.append(f"{name}: exit={result.exit_code}")
        except DsecError as error:
            outcomes.append(f"{name}: {type(error).__name__}")
    inside = _sh(sandbox, "x=$(head -c 3000000 /dev/zero | tr '\\0' a); X=$x /bin/true 2>&1; echo rc=$?")
    outcomes.append("inside " + ("E2BIG" if "too long" in inside else inside[-20:]))
    bystander = spawn()
    answers = "ok" in _sh(bystander, "echo ok") and "ok" in _sh(sandbox, "echo ok")
    listed = hostile_client.list() is not None
    contained = answers and listed  # every outcome above is an exit status or a typed DsecError, never a hang
    assert record(case[0], "huge argv/env (3 MB, 40k args, 70 MB command)", " ".join(outcomes), contained)
