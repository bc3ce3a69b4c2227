"""Egress allowlist plumbing for container sandboxes: a named netns, a veth pair to the host, an nftables table.

Why this shape: a sandbox with an allowlist gets its own network namespace (as with no network at all) plus one
veth pair whose host end has a /30 from a dsec pool; the host routes and masquerades its traffic, and one
nftables table per sandbox (keyed by the sandbox id, hooked on the host's input, forward and postrouting) drops
everything from that veth except the allowlisted destinations and replies, and everything *into* it that the
sandbox did not ask for (so sandboxes cannot reach each other). The filter lives on the host, not in the
sandbox, so root inside the sandbox cannot change it (it has no CAP_NET_ADMIN anyway).

The netns is a named one (`ip netns`, a bind mount under /run/netns): crun and runc join it by path, the Docker
driver attaches its container's netns under the same name, so one teardown serves both. /30 slots are files in a
machine-wide allocation directory, created atomically with link(2), so concurrent servers never share one.
`network.json` in the sandbox's state dir is written before anything exists; teardown works from it alone and
is idempotent, so destroy, a failed create and crash cleanup after kill -9 all run the same code.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dsec.allowlist import Destination, hosts_lines, parse_allowlist, resolve
from dsec.errors import CapacityExceeded, RuntimeFailure

POOL = ipaddress.IPv4Network("10.213.0.0/16")
SLOT_PREFIX = 30
SLOTS = 1 << (SLOT_PREFIX - POOL.prefixlen)
ALLOC_DIR = Path("/run/dsec/net/slots")
NETNS_DIR = Path("/run/netns")
RECORD_NAME = "network.json"
HOSTS_NAME = "hosts"
SANDBOX_IF = "eth0"
COMMAND_TIMEOUT_S = 30.0
FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")


@dataclass
class NetworkRecord:
    """What the allowlist plumbing of one sandbox creates on the host (names derive from the id and the slot)."""

    sandbox_id: str
    netns: str
    table: str
    slot: int = -1  # -1: not allocated yet (teardown then looks the slot up by owner)
    destinations: list[str] = field(default_factory=list)

    def write(self, state_dir: Path) -> None:
        tmp = state_dir / (RECORD_NAME + ".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, state_dir / RECORD_NAME)

    @classmethod
    def read(cls, state_dir: Path) -> NetworkRecord | None:
        try:
            data = json.loads((state_dir / RECORD_NAME).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RuntimeFailure(f"unreadable network record in {state_dir}: {exc}; remove its netns and nft table by hand") from exc
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


@dataclass(frozen=True)
class Link:
    """The addresses and interface names of one /30 slot."""

    slot: int

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network((int(POOL.network_address) + (self.slot << (32 - SLOT_PREFIX)), SLOT_PREFIX))

    @property
    def host_ip(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @property
    def sandbox_ip(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 2

    @property
    def host_if(self) -> str:
        return f"dsh{self.slot}"

    @property
    def peer_if(self) -> str:
        return f"dsc{self.slot}"


def netns_name(sandbox_id: str) -> str:
    return f"dsec-{sandbox_id}"


def table_name(sandbox_id: str) -> str:
    return "dsec_" + "".join(c if c.isalnum() else "_" for c in sandbox_id)


def netns_path(sandbox_id: str) -> Path:
    return NETNS_DIR / netns_name(sandbox_id)


def _run(argv: list[str], sandbox_id: str, stdin: str | None = None, missing_ok: bool = False) -> None:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeFailure(f"sandbox {sandbox_id}: {' '.join(argv[:4])} hung for {COMMAND_TIMEOUT_S:.0f}s", sandbox_id=sandbox_id) from exc
    if proc.returncode == 0:
        return
    err = proc.stderr.strip()
    if missing_ok and any(s in err for s in ("No such file", "Cannot find device", "does not exist")):
        return
    raise RuntimeFailure(f"sandbox {sandbox_id}: `{' '.join(argv)}` failed: {err[-800:]}", sandbox_id=sandbox_id)


def _enable_forwarding(sandbox_id: str) -> None:
    """Routing to destinations beyond the host needs IPv4 forwarding; the per-sandbox tables decide what passes."""
    try:
        if FORWARDING.read_text().strip() != "1":
            FORWARDING.write_text("1")
    except OSError as exc:
        raise RuntimeFailure(
            f"sandbox {sandbox_id}: cannot enable IPv4 forwarding ({exc}); run the server as root", sandbox_id=sandbox_id
        ) from exc


# -- slot allocation -------------------------------------------------------------------------------------------
def allocate_slot(sandbox_id: str, alloc_dir: Path = ALLOC_DIR) -> int:
    """Claim a free /30 slot for `sandbox_id`; the claim file holds the id from the instant it exists."""
    alloc_dir.mkdir(parents=True, exist_ok=True)
    tmp = alloc_dir / f".claim-{sandbox_id}"
    tmp.write_text(sandbox_id)
    try:
        start = int(hashlib.sha256(sandbox_id.encode()).hexdigest(), 16) % SLOTS
        for offset in range(SLOTS):
            slot = (start + offset) % SLOTS
            try:
                os.link(tmp, alloc_dir / str(slot))
                return slot
            except FileExistsError:
                continue
    finally:
        tmp.unlink(missing_ok=True)
    raise CapacityExceeded(
        f"sandbox {sandbox_id}: all {SLOTS} network slots of {POOL} are taken; destroy sandboxes with an allowlist first",
        sandbox_id=sandbox_id,
    )


def slots_of(sandbox_id: str, alloc_dir: Path = ALLOC_DIR) -> list[int]:
    """Slots claimed by `sandbox_id` (a crash between claim and record leaves one only this scan finds)."""
    found = []
    for path in alloc_dir.iterdir() if alloc_dir.is_dir() else ():
        if path.name.isdigit():
            try:
                owner = path.read_text()
            except FileNotFoundError:
                continue
            if owner == sandbox_id:
                found.append(int(path.name))
    return found


def _owns(slot: int, sandbox_id: str, alloc_dir: Path = ALLOC_DIR) -> bool:
    try:
        return (alloc_dir / str(slot)).read_text() == sandbox_id
    except FileNotFoundError:
        return False


def release_slot(slot: int, sandbox_id: str, alloc_dir: Path = ALLOC_DIR) -> None:
    path = alloc_dir / str(slot)
    try:
        if path.read_text() == sandbox_id:
            path.unlink()
    except FileNotFoundError:
        pass


# -- nftables --------------------------------------------------------------------------------------------------
def _allow_rule(match_if: str, destination: Destination) -> str:
    rule = f'iifname "{match_if}" ip daddr {destination.network}'
    if destination.port is not None:
        rule += f" meta l4proto {{ tcp, udp }} th dport {destination.port}"
    return rule + " accept"


def nft_ruleset(table: str, link: Link, destinations: list[Destination]) -> str:
    """One table for one sandbox: its veth may only reach `destinations` (and get replies), nothing may reach it.

    Egress elsewhere is rejected, not dropped, so a blocked connect fails at once instead of hanging the caller.
    """
    host_if = link.host_if
    allows = "\n".join(f"    {_allow_rule(host_if, d)}" for d in destinations)
    egress = f"""    iifname "{host_if}" ip saddr != {link.sandbox_ip} drop
    iifname "{host_if}" ct state established,related accept
{allows}
    iifname "{host_if}" reject with icmpx type admin-prohibited"""
    return f"""table inet {table} {{
  chain input {{
    type filter hook input priority filter - 5; policy accept;
{egress}
  }}
  chain forward {{
    type filter hook forward priority filter - 5; policy accept;
{egress}
    oifname "{host_if}" ct state established,related accept
    oifname "{host_if}" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {link.sandbox_ip} oifname != "{host_if}" masquerade
  }}
}}
"""


# -- setup and teardown ----------------------------------------------------------------------------------------
def prepare(sandbox_id: str, allow: list[str], state_dir: Path) -> Path:
    """Resolve the allowlist, record it and write the sandbox's /etc/hosts; returns that file (to bind-mount).

    Runs before the container exists: the record must precede every resource, and the hosts file must exist
    before a runtime can mount it.
    """
    destinations = resolve(allow, sandbox_id)
    record = NetworkRecord(sandbox_id=sandbox_id, netns=netns_name(sandbox_id), table=table_name(sandbox_id))
    record.destinations = [f"{d.network}" + (f":{d.port}" if d.port else "") for d in destinations]
    state_dir.mkdir(parents=True, exist_ok=True)
    record.write(state_dir)
    lines = dict.fromkeys(["127.0.0.1 localhost", *hosts_lines(allow, destinations)])
    hosts = state_dir / HOSTS_NAME
    hosts.write_text("\n".join(lines) + "\n")
    return hosts


def connect(state_dir: Path, container_pid: int | None = None) -> Path:
    """Create the prepared sandbox's netns, veth pair and filter; returns the netns path (for config.json).

    `container_pid` None: a fresh named netns the runtime joins later (crun, runc); a pid: that process's netns
    (the Docker container, started with network_mode none) is attached under the same name.
    """
    record = NetworkRecord.read(state_dir)
    if record is None:
        raise RuntimeFailure(f"no {RECORD_NAME} in {state_dir}: call network.prepare first")
    sandbox_id = record.sandbox_id
    destinations = [Destination(e.network, e.port, e.text) for e in parse_allowlist(record.destinations) if e.network]
    _enable_forwarding(sandbox_id)
    try:
        record.slot = allocate_slot(sandbox_id)
        record.write(state_dir)
        link = Link(record.slot)
        netns = f"netns add {record.netns}" if container_pid is None else f"netns attach {record.netns} {container_pid}"
        host_cmds = (
            f"{netns}\nlink add {link.host_if} type veth peer name {link.peer_if} netns {record.netns}\n"
            f"addr add {link.host_ip}/{SLOT_PREFIX} dev {link.host_if}\nlink set {link.host_if} up\n"
        )
        _run(["ip", "-batch", "-"], sandbox_id, stdin=host_cmds)
        ns_cmds = (
            f"link set lo up\nlink set {link.peer_if} name {SANDBOX_IF}\n"
            f"addr add {link.sandbox_ip}/{SLOT_PREFIX} dev {SANDBOX_IF}\nlink set {SANDBOX_IF} up\n"
            f"route add default via {link.host_ip}\n"
        )
        _run(["ip", "-n", record.netns, "-batch", "-"], sandbox_id, stdin=ns_cmds)
        _run(["nft", "-f", "-"], sandbox_id, stdin=nft_ruleset(record.table, link, destinations))
    except BaseException:
        teardown(state_dir)
        raise
    return netns_path(sandbox_id)


def teardown(state_dir: Path) -> None:
    """Remove the table, the veth pair, the netns and the slot `network.json` names; a no-op when there is none."""
    record = NetworkRecord.read(state_dir)
    if record is None:
        return
    sandbox_id = record.sandbox_id
    _run(["nft", "delete", "table", "inet", record.table], sandbox_id, missing_ok=True)
    # a slot no longer ours was released after its link was deleted: its link name may be someone else's now
    slots = [slot for slot in ([record.slot] if record.slot >= 0 else slots_of(sandbox_id)) if _owns(slot, sandbox_id)]
    for slot in slots:
        _run(["ip", "link", "delete", Link(slot).host_if], sandbox_id, missing_ok=True)
    if (NETNS_DIR / record.netns).exists():
        _run(["ip", "netns", "delete", record.netns], sandbox_id, missing_ok=True)
    for slot in slots:
        release_slot(slot, sandbox_id)
    (ALLOC_DIR / f".claim-{sandbox_id}").unlink(missing_ok=True)
    (state_dir / RECORD_NAME).unlink(missing_ok=True)
