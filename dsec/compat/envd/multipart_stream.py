"""A multipart/form-data body read part by part as it arrives, for envd's `POST /files`.

Why not a form parser: those spool every file to a temporary file on the door's host before the handler sees
it. Here each part's bytes are pulled from the request only as fast as the sandbox write consumes them
(`part_data()` feeds the parser on demand), so an upload never lands on the host's disk or sits whole in memory.
The parser itself is python-multipart's (the one Starlette uses), driven by its callbacks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

MAX_HEADER_BYTES = 16 << 10  # of one part's headers


class MultipartError(ValueError):
    """The body is not well-formed multipart (the caller answers 400)."""


class MultipartStream:
    def __init__(self, chunks: AsyncIterator[bytes], content_type: str, max_parts: int) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise MultipartError("multipart Content-Type without a boundary")
        self._chunks = chunks
        self._max_parts = max_parts
        self._parts = 0
        self._events: deque[tuple[str, object]] = deque()
        self._eof = False
        self._field, self._value, self._headers, self._header_bytes = b"", b"", {}, 0
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": lambda data, start, end: self._header_part("_field", data[start:end]),
                "on_header_value": lambda data, start, end: self._header_part("_value", data[start:end]),
                "on_header_end": self._on_header_end,
                "on_headers_finished": lambda: self._events.append(("headers", self._headers)),
                "on_part_data": lambda data, start, end: self._events.append(("data", bytes(data[start:end]))),
                "on_part_end": lambda: self._events.append(("end", None)),
            },
        )

    # -- parser callbacks -------------------------------------------------------------------------------------
    def _on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > self._max_parts:
            raise MultipartError(f"more than {self._max_parts} parts in one upload")
        self._headers, self._header_bytes = {}, 0

    def _header_part(self, which: str, data: bytes) -> None:
        self._header_bytes += len(data)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise MultipartError(f"part headers larger than {MAX_HEADER_BYTES} bytes")
        setattr(self, which, getattr(self, which) + data)

    def _on_header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field, self._value = b"", b""

    # -- reading ----------------------------------------------------------------------------------------------
    async def _next_event(self) -> tuple[str, object] | None:
        while not self._events:
            if self._eof:
                return None
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                self._eof = True
                self._finalize()
                continue
            try:
                self._parser.write(chunk)
            except MultipartParseError as exc:
                raise MultipartError(f"malformed multipart body: {exc}") from None
        return self._events.popleft()

    def _finalize(self) -> None:
        try:
            self._parser.finalize()
        except MultipartParseError as exc:
            raise MultipartError(f"malformed multipart body: {exc}") from None

    async def next_part(self) -> tuple[str, str | None] | None:
        """(form field name, filename or None) of the next part, skipping what is left of the current one; None
        at the end of the body."""
        while (event := await self._next_event()) is not None:
            kind, value = event
            if kind == "headers":
                assert isinstance(value, dict)
                _, options = parse_options_header(value.get("content-disposition", ""))
                name = options.get(b"name", b"").decode("utf-8", "replace")
                filename = options.get(b"filename")
                return name, filename.decode("utf-8", "replace") if filename is not None else None
        return None

    async def part_data(self) -> AsyncIterator[bytes]:
        """The current part's bytes, read from the request as they are consumed."""
        while (event := await self._next_event()) is not None:
            kind, value = event
            if kind == "data":
                assert isinstance(value, bytes)
                if value:
                    yield value
            elif kind == "end":
                return
        raise MultipartError("multipart body ended inside a part")
