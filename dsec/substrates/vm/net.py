"""Egress allowlist for VMs: the container plumbing (netns, veth, host nftables table) plus a tap and NAT inside.

Why this shape: the allowlist is enforced on the host by the per-sandbox table of
`dsec.substrates.container.network`, which filters what leaves the sandbox's veth. A VM's QEMU runs inside that
sandbox's netns; its virtio-net NIC is backed by `tap0` there (the gateway, `GATEWAY`), and a masquerade rule
in the netns makes guest traffic leave through the veth with the sandbox's address, so the host-side table
applies exactly as for a container. Every VM is alone in its own netns, so every guest has the same fixed
address (set by the guest init from the kernel command line, before the template is saved) and the same MACs
(a restored guest's ARP cache stays right). Teardown is the container one: deleting the netns removes the tap.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from dsec.errors import RuntimeFailure
from dsec.substrates.container import network

TAP = "tap0"
GUEST_IP = "10.0.2.15"
GATEWAY = "10.0.2.1"
GUEST_PREFIX = 24
GUEST_MAC = "52:54:00:d5:ec:0f"
TAP_MAC = "02:d5:ec:00:02:01"
COMMAND_TIMEOUT_S = 30.0
NAT_TABLE = "dsec_vm"


def guest_net_cmdline() -> str:
    """Kernel parameters the guest init reads to configure eth0 (see init.sh)."""
    return f"dsec.ip={GUEST_IP}/{GUEST_PREFIX} dsec.gw={GATEWAY}"


def _run(argv: list[str], sandbox_id: str, stdin: str | None = None) -> None:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeFailure(f"sandbox {sandbox_id}: {' '.join(argv[:5])} hung for {COMMAND_TIMEOUT_S:.0f}s", sandbox_id=sandbox_id) from exc
    if proc.returncode != 0:
        raise RuntimeFailure(f"sandbox {sandbox_id}: `{' '.join(argv)}` failed: {proc.stderr.strip()[-800:]}", sandbox_id=sandbox_id)


def nat_ruleset() -> str:
    """Inside the netns: guest traffic leaves by the veth under the netns's own address (the host table's match)."""
    return f"""table ip {NAT_TABLE} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {GUEST_IP} oifname != "{TAP}" masquerade
  }}
}}
"""


def add_tap(sandbox_id: str, netns: str) -> None:
    """Give the sandbox's (already connected) netns the guest's gateway: a tap QEMU attaches to, forwarding, NAT."""
    _run(
        ["ip", "-n", netns, "-batch", "-"],
        sandbox_id,
        stdin=(
            f"tuntap add dev {TAP} mode tap\nlink set {TAP} address {TAP_MAC}\n"
            f"addr add {GATEWAY}/{GUEST_PREFIX} dev {TAP}\nlink set {TAP} up\n"
        ),
    )
    _run(["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"], sandbox_id)
    _run(["ip", "netns", "exec", netns, "nft", "-f", "-"], sandbox_id, stdin=nat_ruleset())


def connect_vm(sandbox_id: str, allow: list[str], state_dir: Path) -> tuple[Path, Path]:
    """Build the allowlisted VM's network; returns (netns path to run QEMU in, hosts file for the guest).

    On failure everything built so far is removed (the caller still calls `network.teardown` on later failures).
    """
    hosts = network.prepare(sandbox_id, allow, state_dir)
    netns = network.connect(state_dir)
    try:
        add_tap(sandbox_id, network.netns_name(sandbox_id))
    except BaseException:
        network.teardown(state_dir)
        raise
    return netns, hosts
