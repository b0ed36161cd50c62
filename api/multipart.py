"""multipart/related (RFC 2387) for DICOMweb: a streaming reader for STOW-RS request bodies
(on python-multipart's parser) and a streaming writer for WADO-RS responses."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from email.message import Message
from functools import lru_cache
from typing import TypeVar, cast

import numpy as np
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool


class MultipartError(ValueError):
    """The body is not a well-formed multipart message."""


# A bare type/subtype (RFC 9110 8.3.1 tokens), as most parts of a STOW-RS body are labelled:
# parsed without the email package (~10 us a header).
_BARE_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_media_type(header: str | None) -> tuple[str, dict[str, str]]:
    """('type/subtype', {param: value}) of a Content-Type header, lower-cased type and keys."""
    if not header:
        return "", {}
    mtype, params = _parse_media_type(header)
    return mtype, dict(params)


@lru_cache(maxsize=1024)
def _parse_media_type(header: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """parse_media_type's answer, remembered: a client sends the same few Accept and
    Content-Type values on every request, and the email package takes ~50 us a header."""
    bare = header.strip()
    if _BARE_MEDIA_TYPE.fullmatch(bare):
        return bare.lower(), ()
    msg = Message()
    msg["content-type"] = header
    params = {k.lower(): v for k, v in msg.get_params(failobj=[])[1:]}
    return msg.get_content_type().lower(), tuple(params.items())


T = TypeVar("T")


def negotiate(header: str | None, choose: Callable[[str, dict[str, str]], T | None]) -> list[T]:
    """Content negotiation (RFC 9110 12.5.1) over an Accept header ("*/*" when absent): what
    choose makes of each item (media type, parameters) it does not refuse with None, highest
    q-value first and in header order among equals. q=0 means "not acceptable" (12.4.2) and
    drops the item; a malformed q counts as 1."""
    ranked: list[tuple[float, int, T]] = []
    for n, item in enumerate((header or "*/*").split(",")):
        mtype, params = parse_media_type(item.strip())
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            q = 1.0
        if q > 0 and (choice := choose(mtype, params)) is not None:
            ranked.append((-q, n, choice))
    ranked.sort(key=lambda t: t[:2])
    return [choice for _, _, choice in ranked]


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

    @property
    def headers(self) -> dict[str, str]:
        """The headers of the part being read (lower-case names), as accept and new_sink
        see them when they are called."""
        return self._headers

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


# RFC 2046 5.1.1: at most 70 characters. The longest allowed: a client finds the parts by
# searching the body for the delimiter, and a search skips ahead by up to the delimiter's length
# at each mismatch (as CPython's bytes.find and count do): a 72-byte delimiter instead of a
# 34-byte one halves the client's cost of scanning the pixel data for it (23 vs 53 ms of CPU per
# 105 MB of CT series with bytes.count).
BOUNDARY_CHARS = 70


def new_boundary() -> str:
    """A boundary that cannot occur in the payload by chance (random hex, RFC 2046's longest)."""
    return secrets.token_hex(BOUNDARY_CHARS // 2)


@dataclass(frozen=True)
class Loaded:
    """A part whose content type and length are known only once it is loaded (a transcoded
    instance): a loader returns this instead of the bare body."""

    ctype: str
    body: bytes | Iterator[bytes]
    length: int | None


@dataclass(frozen=True)
class Fill:
    """A part of known length whose body is read straight into the buffer that is sent, after
    its head (no copy of the body to frame it): fill(view) writes exactly len(view) bytes.
    cached(view), when given, does the same from memory only (the page cache), fit for the
    event loop, and returns False instead of waiting for a disk. mapped(), when given, returns
    the body itself as a view of the memory that holds it (a mapping of the page cache), or
    None when not all of it is in memory: a large body is sent from there, not copied into a
    buffer first."""

    fill: Callable[[memoryview], None]
    cached: Callable[[memoryview], bool] | None = None
    mapped: Callable[[], memoryview | None] | None = None


# One part of a response: content type, length if known, and a Fill, or a loader that returns
# the whole body (small objects), a Fill, an iterator of chunks (large ones) or a Loaded.
# Loaders run in worker threads.
PartLoader = Callable[[], "bytes | Fill | Iterator[bytes] | Loaded"]
PartSource = tuple[str, int | None, PartLoader | Fill]


def part_head(
    boundary: str, ctype: str, length: int | None, extra: dict[str, str] | None = None
) -> bytes:
    """The delimiter and headers that open one part of a multipart/related body."""
    head = f"--{boundary}\r\nContent-Type: {ctype}\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    for name, value in (extra or {}).items():
        head += f"{name}: {value}\r\n"
    return (head + "\r\n").encode()


def closing(boundary: str) -> bytes:
    """The delimiter that ends a multipart/related body."""
    return f"--{boundary}--\r\n".encode()


async def write_parts(boundary: str, parts: Sequence[PartSource]) -> AsyncIterator[bytes]:
    """The body of a multipart/related response, streamed. Consecutive small parts are read
    together (up to GROUP_BYTES) in one worker-thread call, and the next group is read while
    the current one is being sent; large parts are streamed in chunks. Groups of Fills whose
    bytes are all in memory (Fill.cached) are read on the event loop instead, up to
    CACHED_GROUP_BYTES at a time, each just before it is sent: no thread hop, and the bytes are
    still in the processor's cache when the kernel copies them to the socket (and the client
    from it); a body of MAP_MIN bytes or more that can be mapped (Fill.mapped) is sent from the
    page cache itself, after its head. From the first group that is not all in memory on, the
    rest is read in threads."""
    groups = _groups(parts)
    pending: asyncio.Future[list[_Ready]] | None = None
    try:
        for i, group in enumerate(groups):
            ready = _load_cached(boundary, group, i == 0) if pending is None else None
            if ready is None:
                if pending is None:  # not all in memory: from here on, read in threads
                    pending = _load(boundary, group, i == 0)
                ready = await pending
                pending = _load(boundary, groups[i + 1], False) if i + 1 < len(groups) else None
            for item in ready:
                if not isinstance(item, tuple):
                    yield item  # type: ignore[misc]  # StreamingResponse sends memoryviews too
                    continue
                head, body = item
                yield head
                if isinstance(body, bytes):
                    yield body
                else:
                    async for chunk in iterate_in_threadpool(body):
                        yield chunk
        yield (b"\r\n" if groups else b"") + closing(boundary)
    finally:
        if pending is not None:
            pending.cancel()


def body_length(boundary: str, parts: Sequence[PartSource]) -> int:
    """The length of the body write_parts makes of parts whose lengths are all known and
    whose loaders return exactly that many bytes (no Loaded)."""
    total = len(closing(boundary))
    for ctype, length, _ in parts:
        assert length is not None
        total += len(part_head(boundary, ctype, length)) + length + 2
    return total


GROUP_BYTES = 8 << 20
# Parts read on the event loop, from memory, go in groups this small (each part alone, from
# half a megabyte on): read and sent while in the processor's cache, and a short hold of the
# loop. Interleaved retrieves of a 200-instance CT series, client CPU per series (median):
# 54 ms in groups of 1 MiB, 62 ms in groups of 8 MiB read in threads.
CACHED_GROUP_BYTES = 1 << 20


# The first group is this small, so that the first bytes go out while the next group is read.
FIRST_GROUP_BYTES = 1 << 20
# Bodies from this size on are sent from a mapping of the page cache (Fill.mapped) when they
# can be: the kernel copies them to the socket from there, one copy instead of two. Smaller
# ones are read into their group's buffer: a mapping costs three system calls, and each body
# sent alone an ASGI message. 200-instance CT series (0.5 MB each) retrieved with
# bench/ingest.py's client: 2,860 MB/s mapped, 1,840 MB/s read into 1 MiB groups (medians
# of 9 and 7 retrieves); Orthanc 1,900-2,000 in the same runs.
MAP_MIN = 256 << 10


def _cached(part: PartSource) -> bool:
    """Whether a part's body can be read from memory on the event loop."""
    body = part[2]
    return isinstance(body, Fill) and (body.cached or body.mapped) is not None


def _groups(parts: Sequence[PartSource]) -> list[list[PartSource]]:
    limit = CACHED_GROUP_BYTES if all(_cached(p) for p in parts) else GROUP_BYTES
    groups: list[list[PartSource]] = []
    size = limit
    for part in parts:
        length = part[1] or limit
        if size + length > (FIRST_GROUP_BYTES if len(groups) <= 1 else limit):
            groups.append([])
            size = 0
        groups[-1].append(part)
        size += length
    return groups


# What a worker thread makes of a group of parts, to be sent as it is: runs of consecutive parts
# in one buffer each (every part with the CRLF that ends the part before it, if any, its head
# and its body), or the head of a part and the body to send after it (a large one, streamed or
# not copied to join it to its head).
_Ready = bytes | memoryview | tuple[bytes, bytes | Iterator[bytes]]
# Bodies up to this size are joined to their head (a copy), so that the part is one write.
JOIN_MAX = 64 << 10


def _head(boundary: str, ctype: str, length: int | None, first: bool) -> bytes:
    """A part's head, after the CRLF that ends the part before it (none before the first)."""
    head = part_head(boundary, ctype, length)
    return head if first else b"\r\n" + head


class _NotInMemory(Exception):
    """A Fill's bytes are not all in memory."""


def _load_cached(boundary: str, group: list[PartSource], first: bool) -> list[_Ready] | None:
    """A group of Fills on the event loop from memory: large bodies mapped, sent after their
    heads, the rest read into buffers; None when it is not all there (or not all Fills that
    can say so)."""
    ready: list[_Ready] = []
    run: list[tuple[bytes, bytes | Fill, int]] = []
    try:
        for n, part in enumerate(group):
            ctype, length, body = part
            if not _cached(part) or length is None:
                return None
            fill = cast(Fill, body)
            head = _head(boundary, ctype, length, first and n == 0)
            if fill.mapped is None or length < MAP_MIN:
                run.append((head, fill, length))
                continue
            mapped = fill.mapped()
            if mapped is None:
                return None
            if run:
                ready.append(_joined(run, cached=True))
                run = []
            ready += [head, mapped]
        return [*ready, _joined(run, cached=True)] if run else ready
    except _NotInMemory:
        return None


def _load(boundary: str, group: list[PartSource], first: bool) -> asyncio.Future[list[_Ready]]:
    def load() -> list[_Ready]:
        ready: list[_Ready] = []
        run: list[tuple[bytes, bytes | Fill, int]] = []  # (head, body, length) to join
        for n, (ctype, length, source) in enumerate(group):
            body = source if isinstance(source, Fill) else source()
            if isinstance(body, Loaded):
                ctype, length, body = body.ctype, body.length, body.body
            head = _head(boundary, ctype, length, first and n == 0)
            if isinstance(body, Fill):
                assert length is not None
                run.append((head, body, length))
            elif isinstance(body, bytes) and len(body) <= JOIN_MAX:
                run.append((head, body, len(body)))
            else:
                ready += [_joined(run), (head, body)] if run else [(head, body)]
                run = []
        return [*ready, _joined(run)] if run else ready

    return asyncio.ensure_future(run_in_threadpool(load))


def _joined(run: list[tuple[bytes, bytes | Fill, int]], cached: bool = False) -> memoryview:
    """Consecutive parts in one buffer, each body read (a Fill) or copied into place: one
    ASGI message and one write for the lot, not one or two per part. With cached, the Fills
    are read from memory only (_NotInMemory when one is not all there)."""
    # Left uninitialised (a bytearray would be zeroed first: a pass over megabytes that are
    # overwritten at once).
    view = memoryview(np.empty(sum(len(head) + length for head, _, length in run), np.uint8))
    at = 0
    for head, body, length in run:
        view[at : at + len(head)] = head
        at += len(head)
        if not isinstance(body, Fill):
            view[at : at + length] = body
        elif not cached:
            body.fill(view[at : at + length])
        elif body.cached is None or not body.cached(view[at : at + length]):
            raise _NotInMemory
        at += length
    return view
