"""multipart/related (RFC 2387) for DICOMweb: a streaming reader for STOW-RS request bodies
(on python-multipart's parser) and a streaming writer for WADO-RS responses."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from email.message import Message

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser


class MultipartError(ValueError):
    """The body is not a well-formed multipart message."""


def parse_media_type(header: str | None) -> tuple[str, dict[str, str]]:
    """('type/subtype', {param: value}) of a Content-Type header, lower-cased type and keys."""
    if not header:
        return "", {}
    msg = Message()
    msg["content-type"] = header
    params = {k.lower(): v for k, v in msg.get_params(failobj=[])[1:]}
    return msg.get_content_type().lower(), params


class PartReader:
    """Feeds a multipart body through python-multipart; yields each complete part.

    new_sink() makes a sink (with write/finish/discard) for one part's bytes; accept(ctype)
    says whether a part's Content-Type is wanted; rejected parts are drained, not kept."""

    def __init__(
        self,
        boundary: str,
        new_sink: Callable[[], object],
        accept: Callable[[str], bool],
    ) -> None:
        self._new_sink = new_sink
        self._accept = accept
        self._done: list[tuple[str, object | None]] = []
        self._sink: object | None = None
        self._headers: dict[str, str] = {}
        self._field = bytearray()
        self._value = bytearray()
        self.ended = False
        self.open_part = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
            max_header_count=32,
        )

    def _part_begin(self) -> None:
        self.open_part = True
        self._headers = {}
        self._sink = None

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode(
            "latin-1"
        ).strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        ctype = self._headers.get("content-type", "")
        if self._accept(ctype):
            self._sink = self._new_sink()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._sink is not None:
            self._sink.write(memoryview(data)[start:end])  # type: ignore[attr-defined]

    def _part_end(self) -> None:
        self.open_part = False
        ctype = self._headers.get("content-type", "")
        self._done.append((ctype, self._sink))
        self._sink = None

    def _end(self) -> None:
        self.ended = True

    def feed(self, chunk: bytes) -> list[tuple[str, object | None]]:
        """Parse a chunk; return the parts it completed as (content type, sink or None)."""
        try:
            self._parser.write(chunk)
        except MultipartParseError as e:
            self.abort()
            raise MultipartError(str(e)) from e
        done, self._done = self._done, []
        return done

    def abort(self) -> None:
        """Drop a part that will never complete."""
        if self._sink is not None:
            self._sink.discard()  # type: ignore[attr-defined]
            self._sink = None

    async def parts(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[str, object | None]]:
        """Every complete part of the body read from chunks."""
        async for chunk in chunks:
            for part in self.feed(chunk):
                yield part
        self._parser.finalize()
        if self.open_part:
            self.abort()


def new_boundary() -> str:
    """A boundary that cannot occur in the payload by chance."""
    return secrets.token_hex(16)


def write_parts(
    boundary: str, parts: Iterable[tuple[str, int | None, Iterable[bytes]]]
) -> Iterator[bytes]:
    """The body of a multipart/related response: (content type, length, chunks) per part."""
    delimiter = f"--{boundary}\r\n".encode()
    for ctype, length, chunks in parts:
        head = f"Content-Type: {ctype}\r\n"
        if length is not None:
            head += f"Content-Length: {length}\r\n"
        yield delimiter + head.encode() + b"\r\n"
        yield from chunks
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()
