"""A reply the host cannot parse (the agent runs inside the sandbox, whose root can reach its socket) is a typed
RuntimeFailure, never a raw ValueError or IndexError (found by bench/fuzz.py's agent-client target)."""

from __future__ import annotations

import os
import struct
import threading

import pytest

from dsec.agent.client import AgentClient
from dsec.errors import RuntimeFailure

HEADER = struct.Struct(">BII")


def _frame(ftype: int, payload: bytes, rid: int = 1) -> bytes:
    return HEADER.pack(ftype, rid, len(payload)) + payload


def _on_request(replies: bytes, rid: int) -> bytes:
    """`replies` with every frame's request id set to `rid` (request ids start at a random point: a restored
    guest agent may still hold the ids of processes running at snapshot time)."""
    out, at = bytearray(), 0
    while at < len(replies):
        ftype, _, length = HEADER.unpack_from(replies, at)
        out += HEADER.pack(ftype, rid, length) + replies[at + HEADER.size : at + HEADER.size + length]
        at += HEADER.size + length
    return bytes(out)


def _answer(operation, replies: bytes):
    """Run `operation(client)` against a fake agent that answers the client's request with `replies`, then closes."""
    to_client_r, to_client_w = os.pipe()
    from_client_r, from_client_w = os.pipe()
    client = AgentClient.from_fds(to_client_r, from_client_w)
    outcome: dict = {}

    def call() -> None:
        try:
            outcome["value"] = operation(client)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            outcome["error"] = exc

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    request = os.read(from_client_r, 65536)  # the request went out: replies now land on its id
    os.write(to_client_w, _on_request(replies, HEADER.unpack_from(request)[1]))
    os.close(to_client_w)
    worker.join(30)
    client.close()
    os.close(from_client_r)
    assert not worker.is_alive()
    return outcome


ENTRY = b"x\x00file\x00" + b"5\x00" + b"644\x00" + b"1700000000.5\x00"


@pytest.mark.parametrize(
    "operation, replies",
    [
        (lambda c: c.stat("/x"), _frame(0x87, ENTRY.replace(b"1700000000.5", b"17A0"))),
        (lambda c: c.stat("/x"), _frame(0x87, b"x\0file\0")),
        (lambda c: c.list_dir("/"), _frame(0x87, ENTRY.replace(b"644", b"9z9")) + _frame(0x86, b"")),
        (lambda c: c.stat_info("/x"), _frame(0x87, ENTRY)),  # too few fields for the long form
        (lambda c: list(c.spawn(["true"]).events()), _frame(0x84, b"pid\0")),
        (lambda c: list(c.spawn(["true"]).events()), _frame(0x84, b"7\0") + _frame(0x83, b"0\0")),
        (lambda c: list(c.spawn(["true"]).events()), _frame(0x84, b"7\0") + _frame(0x83, b"zero\0nine\0")),
    ],
)
def test_a_malformed_reply_is_a_runtime_failure(operation, replies):
    outcome = _answer(operation, replies)
    assert isinstance(outcome.get("error"), RuntimeFailure), outcome
    assert "malformed" in str(outcome["error"]) or "connection lost" in str(outcome["error"])


def test_a_well_formed_reply_still_parses():
    assert _answer(lambda c: c.stat("/x"), _frame(0x87, ENTRY))["value"].mtime == 1700000000.5
