"""The trajectory log's record: what one append says, and its checksummed on-disk frame.

Why a hand-rolled frame and not JSON lines: a record carries opaque result bytes (a serialized ExecRecord,
a pickled call result) that must come back bit for bit, and a crash can tear the last write anywhere. Each
frame is ``MAGIC | body length (u32 BE) | crc32(body) (u32 BE) | body`` so a reader can tell a complete,
intact record from a torn tail. The body is a fixed header (type, step, timestamps, nine field lengths)
followed by the fields' bytes: packing it with one struct call keeps encoding at a few microseconds, which
matters because every tool call appends two records.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"DTL2"
_FRAME = struct.Struct(">4sII")
FRAME_HEADER_SIZE = _FRAME.size
_BODY = struct.Struct(">Bqdd9I")
_TEXT_FIELDS = ("trajectory_id", "request_hash", "kind", "sandbox_id", "snapshot_ref", "parent_id", "error")
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
        fields = [
            self.trajectory_id.encode(), self.request_hash.encode(), self.kind.encode(), self.sandbox_id.encode(),
            self.snapshot_ref.encode(), self.parent_id.encode(), self.error.encode(), self.request, self.result,
        ]  # fmt: skip
        header = _BODY.pack(int(self.type), self.step, self.started_at, self.finished_at, *map(len, fields))
        body = header + b"".join(fields)
        return _FRAME.pack(MAGIC, len(body), zlib.crc32(body)) + body


class CorruptRecord(Exception):
    """A frame that is torn or fails its checksum (internal: the log decides whether that is a torn tail)."""


@dataclass(slots=True)
class Decoded:
    record: Record
    size: int  # bytes the frame occupies, header included


def decode_body(body: bytes) -> Record:
    """Parse a body whose checksum already matched."""
    rtype, step, started_at, finished_at, *lengths = _BODY.unpack_from(body, 0)
    if _BODY.size + sum(lengths) != len(body):
        raise ValueError("field lengths do not add up to the body length")
    values: list[bytes] = []
    offset = _BODY.size
    for length in lengths:
        values.append(body[offset : offset + length])
        offset += length
    text = dict(zip(_TEXT_FIELDS, (v.decode() for v in values[:7]), strict=True))
    return Record(
        type=RecordType(rtype), step=step, started_at=started_at, finished_at=finished_at,
        request=values[7], result=values[8], **text,
    )  # fmt: skip


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
    except (ValueError, struct.error) as exc:
        raise CorruptRecord(f"undecodable body: {exc}") from exc
    return Decoded(record=record, size=FRAME_HEADER_SIZE + length)
