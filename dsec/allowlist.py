"""The egress allowlist of a sandbox: parse entries strictly, resolve names on the host at create time.

Why here and not in a substrate: the spec validates entries (the SDK rejects a typo before any RPC, the server
turns the same error into InvalidSpec), and every substrate that implements egress filtering resolves them the
same way. Entries are `host-or-ipv4[:port]` or `ipv4-cidr[:port]`; a port allows TCP and UDP to it, no port allows
every protocol. IPv6 is refused: sandboxes get an IPv4 link only, so an IPv6 rule would be a silent no-op.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
from dataclasses import dataclass

from dsec.errors import InvalidSpec

MAX_ENTRIES = 64
MAX_ENTRY_LENGTH = 260  # a 253-character name plus ":65535"
RESOLVE_TIMEOUT_S = 10.0
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?", re.IGNORECASE)
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class AllowEntry:
    """One parsed entry: either a literal network (an address is a /32) or a hostname, and an optional port."""

    text: str
    network: ipaddress.IPv4Network | None
    hostname: str
    port: int | None


@dataclass(frozen=True)
class Destination:
    """A resolved entry: what the filter lets through."""

    network: ipaddress.IPv4Network
    port: int | None
    source: str  # the entry it came from, for error messages and the record


def parse_entry(entry: str) -> AllowEntry:
    """Parse one entry; ValueError naming the entry and what is wrong with it."""
    if not isinstance(entry, str) or not entry or len(entry) > MAX_ENTRY_LENGTH:
        raise ValueError(f"allowlist entry {entry!r} must be a non-empty string of at most {MAX_ENTRY_LENGTH} characters")
    if entry.startswith("[") or entry.count(":") > 1:
        raise ValueError(f"allowlist entry {entry!r}: IPv6 destinations are not supported (sandboxes get IPv4 only)")
    target, sep, port_text = entry.partition(":")
    port = None
    if sep:
        if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"allowlist entry {entry!r}: port must be a number from 1 to 65535")
        port = int(port_text)
    if "/" in target:
        try:
            network = ipaddress.IPv4Network(target, strict=True)
        except ValueError as exc:
            raise ValueError(f"allowlist entry {entry!r}: not an IPv4 CIDR with host bits zero ({exc})") from None
        return AllowEntry(entry, network, "", port)
    try:
        return AllowEntry(entry, ipaddress.IPv4Network(ipaddress.IPv4Address(target)), "", port)
    except ValueError:
        pass
    numeric_tld = target.rstrip(".").rsplit(".", 1)[-1].isdigit()
    if len(target) > 253 or not _HOSTNAME.fullmatch(target) or numeric_tld:
        raise ValueError(f"allowlist entry {entry!r}: {target!r} is neither an IPv4 address, an IPv4 CIDR nor a hostname")
    return AllowEntry(entry, None, target.rstrip(".").lower(), port)


def parse_allowlist(entries: list[str]) -> list[AllowEntry]:
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"at most {MAX_ENTRIES} allowlist entries, got {len(entries)}")
    return [parse_entry(entry) for entry in entries]


def resolve(entries: list[str], sandbox_id: str) -> list[Destination]:
    """Resolve the allowlist on the host, now: a name's addresses at create time are what the sandbox may reach."""
    destinations: list[Destination] = []
    for entry in parse_allowlist(entries):
        if entry.network is not None:
            destinations.append(Destination(entry.network, entry.port, entry.text))
            continue
        for address in _lookup(entry, sandbox_id):
            destinations.append(Destination(ipaddress.IPv4Network(address), entry.port, entry.text))
    return destinations


def _lookup(entry: AllowEntry, sandbox_id: str) -> list[str]:
    """The name's IPv4 addresses; bounded in time (a slow resolver must not hang a create: getaddrinfo cannot be
    cancelled, so it runs in a daemon thread that is abandoned after the deadline)."""
    found: dict[str, object] = {}

    def lookup() -> None:
        try:
            found["infos"] = socket.getaddrinfo(entry.hostname, None, socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            found["error"] = exc

    worker = threading.Thread(target=lookup, daemon=True, name=f"dsec-resolve-{entry.hostname[:32]}")
    worker.start()
    worker.join(RESOLVE_TIMEOUT_S)
    if "infos" not in found:
        why = found.get("error", f"no answer in {RESOLVE_TIMEOUT_S:.0f}s")
        raise InvalidSpec(
            f"sandbox {sandbox_id}: allowlist entry {entry.text!r} does not resolve on the server ({why}); "
            "use an address or a name the server's resolver knows",
            sandbox_id=sandbox_id,
        )
    return sorted({info[4][0] for info in found["infos"]})  # type: ignore[union-attr]


def hosts_lines(entries: list[str], destinations: list[Destination]) -> list[str]:
    """`/etc/hosts` lines for the allowlisted names, so a sandbox without DNS reaches them by name."""
    names = {entry.text: entry.hostname for entry in parse_allowlist(entries)}
    lines = []
    for destination in destinations:
        name = names.get(destination.source, "")
        line = f"{destination.network.network_address} {name}"
        if name and line not in lines:
            lines.append(line)
    return lines
