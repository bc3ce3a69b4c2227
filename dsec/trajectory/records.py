"""The trajectory log's record: what one append says, and its checksummed on-disk frame.

Why a hand-rolled frame and not JSON lines: a record carries opaque result bytes (a serialized ExecRecord,
a pickled call result) that must come back bit for bit, and a crash can tear the last write anywhere. Each
frame is ``MAGIC | body length (u32 BE) | crc32(body) (u32 BE) | body`` so a reader can tell a complete,
intact record from a torn tail, and the body is ``type (u8) | meta length (u32 BE) | meta JSON | request |
result`` so the metadata stays readable while the blobs stay raw.
"""

from __future__ import annotations

import enum
import json
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"DTL1"
_FRAME = struct.Struct(">4sII")
FRAME_HEADER_SIZE = _FRAME.size
_BODY = struct.Struct(">BI")
MAX_BODY = 1 << 30  # a length above this is corruption, not a record


class RecordType(enum.IntEnum):
    INTENT = 1  # a call is about to execute: written durably before `execute` runs
    RESULT = 2  # the call's result: written durably before the caller sees it
    ABANDON = 3  # an intent whose effect is unknown or failed; the step may run again
    FORK = 4  # a new trajectory sharing steps [0, step) of `parent_id`
    SNAPSHOT = 5  # the sandbox state after `step` is saved as `snapshot_ref`
    ATTACH = 6  # the trajectory now runs in `sandbox_id`
    DELETE = 7  # retention: the trajectory is gone
    COMPACTED = 8  # first record of a compacted segment: every lower-numbered segment is superseded


class StepState(str, enum.Enum):
    INTENT = "intent"
    DONE = "done"
    ABANDONED = "abandoned"


@dataclass(frozen=True, slots=True)
class Record:
    """One append. Which fields matter depends on `type` (see RecordType)."""

    type: RecordType
    trajectory_id: str
    step: int = -1
    request_hash: str = ""
    kind: str = ""
    sandbox_id: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    snapshot_ref: str = ""
    parent_id: str = ""
    error: str = ""
    request: bytes = b""
    result: bytes = b""

    def encode(self) -> bytes:
        """The full frame, ready to append."""
        meta: dict[str, object] = {"t": self.trajectory_id}
        for key, value, empty in (
            ("s", self.step, -1),
            ("h", self.request_hash, ""),
            ("k", self.kind, ""),
            ("sb", self.sandbox_id, ""),
            ("t0", self.started_at, 0.0),
            ("t1", self.finished_at, 0.0),
            ("snap", self.snapshot_ref, ""),
            ("p", self.parent_id, ""),
            ("e", self.error, ""),
            ("rl", len(self.request), 0),
        ):
            if value != empty:
                meta[key] = value
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
        body = b"".join((_BODY.pack(int(self.type), len(meta_bytes)), meta_bytes, self.request, self.result))
        return _FRAME.pack(MAGIC, len(body), zlib.crc32(body)) + body


class CorruptRecord(Exception):
    """A frame that is torn or fails its checksum (internal: the log decides whether that is a torn tail)."""


@dataclass(slots=True)
class Decoded:
    record: Record
    size: int  # bytes the frame occupies, header included


def decode_body(body: bytes) -> Record:
    """Parse a body whose checksum already matched."""
    rtype, meta_len = _BODY.unpack_from(body, 0)
    meta_end = _BODY.size + meta_len
    meta = json.loads(body[_BODY.size : meta_end])
    request_len = int(meta.get("rl", 0))
    result_start = meta_end + request_len
    record = Record(
        type=RecordType(rtype),
        trajectory_id=meta["t"],
        step=int(meta.get("s", -1)),
        request_hash=meta.get("h", ""),
        kind=meta.get("k", ""),
        sandbox_id=meta.get("sb", ""),
        started_at=float(meta.get("t0", 0.0)),
        finished_at=float(meta.get("t1", 0.0)),
        snapshot_ref=meta.get("snap", ""),
        parent_id=meta.get("p", ""),
        error=meta.get("e", ""),
        request=body[meta_end:result_start],
        result=body[result_start:],
    )
    return record


def decode_frame(buf: bytes | memoryview, offset: int) -> Decoded:
    """Decode the frame at `offset`; raises CorruptRecord if it is incomplete or its checksum fails."""
    if len(buf) - offset < FRAME_HEADER_SIZE:
        raise CorruptRecord("incomplete header")
    magic, length, crc = _FRAME.unpack_from(buf, offset)
    if magic != MAGIC:
        raise CorruptRecord("bad magic")
    if length > MAX_BODY or len(buf) - offset - FRAME_HEADER_SIZE < length:
        raise CorruptRecord("incomplete body")
    start = offset + FRAME_HEADER_SIZE
    body = bytes(buf[start : start + length])
    if zlib.crc32(body) != crc:
        raise CorruptRecord("checksum mismatch")
    try:
        record = decode_body(body)
    except (ValueError, KeyError, struct.error) as exc:
        raise CorruptRecord(f"undecodable body: {exc}") from exc
    return Decoded(record=record, size=FRAME_HEADER_SIZE + length)
