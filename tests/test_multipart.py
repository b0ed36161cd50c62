"""multipart/related reading and writing on their own."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Iterator
from email.parser import BytesParser
from email.policy import HTTP
from typing import cast

import pytest

from carina.api.multipart import (
    GROUP_BYTES,
    MAP_MIN,
    Fill,
    MultipartError,
    PartReader,
    new_boundary,
    write_parts,
)


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: bytes | memoryview) -> None:
        self.data += b

    def finish(self) -> bytes:
        return bytes(self.data)

    def discard(self) -> None:
        self.data.clear()


def read_all(body: bytes, chunk: int) -> list[tuple[str, bytes | None]]:
    reader = PartReader("XyZ", Sink, accept=lambda ctype: ctype == "application/dicom")
    out = []
    for i in range(0, len(body), chunk):
        for ctype, sink in reader.feed(body[i : i + chunk]):
            out.append((ctype, sink.finish() if sink else None))
    assert reader.ended
    return out


BODY = (
    b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + b"A" * 5000 + b"\r\n"
    b"--XyZ\r\nContent-Type: text/plain\r\n\r\nskip me\r\n"
    b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + b"\r\n--Xy" * 50 + b"\r\n"
    b"--XyZ--\r\n"
)


@pytest.mark.parametrize("chunk", [1, 7, 4096, len(BODY)])
def test_parts_are_the_same_whatever_the_chunking(chunk: int) -> None:
    parts = read_all(BODY, chunk)
    assert [c for c, _ in parts] == ["application/dicom", "text/plain", "application/dicom"]
    assert parts[0][1] == b"A" * 5000
    assert parts[1][1] is None  # not accepted: drained, not kept
    assert parts[2][1] == b"\r\n--Xy" * 50  # boundary look-alikes inside a part survive


def test_boundary_without_line_end_is_data_and_leaves_the_body_unfinished() -> None:
    # RFC 2046 5.1.1: a delimiter is the boundary followed by CRLF or "--"; anything else
    # is part of the data, so this body never closes (STOW reports the missing boundary).
    reader = PartReader("XyZ", Sink, accept=lambda ctype: True)
    done = reader.feed(b"--XyZ\r\nContent-Type: a/b\r\n\r\nx\r\n--XyZgarbage")
    assert done == []
    assert reader.open_part and not reader.ended


def test_body_that_is_not_multipart_is_refused() -> None:
    reader = PartReader("XyZ", Sink, accept=lambda ctype: True)
    with pytest.raises(MultipartError):
        reader.feed(b"this is no multipart body at all, not even close to one")


def collect(parts: list) -> bytes:
    async def run() -> bytes:
        return b"".join([chunk async for chunk in write_parts("BND", parts)])

    return asyncio.run(run())


def test_written_parts_parse_back_in_order_small_and_large() -> None:
    small = [bytes([65 + i]) * (GROUP_BYTES // 3) for i in range(5)]
    large = b"L" * (GROUP_BYTES + 5)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(large), 1 << 20):
            yield large[i : i + (1 << 20)]

    parts = [("application/dicom", len(b), (lambda b=b: b)) for b in small[:2]]
    parts.append(("application/dicom", len(large), chunks))
    parts += [("application/dicom", len(b), (lambda b=b: b)) for b in small[2:]]
    body = collect(parts)
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: multipart/related; boundary=BND\r\n\r\n" + body
    )
    got = [p.get_payload(decode=True) for p in msg.iter_parts()]
    assert got == [*small[:2], large, *small[2:]]


def test_no_parts_is_just_the_closing_delimiter() -> None:
    assert collect([]) == b"--BND--\r\n"


def test_new_boundaries_are_random_and_as_long_as_rfc_2046_allows() -> None:
    # A client scans the whole body for the delimiter; the longer it is, the further each
    # mismatch lets the scan skip (api/multipart.py).
    boundaries = {new_boundary() for _ in range(100)}
    assert len(boundaries) == 100
    # RFC 2046 5.1.1: 1 to 70 characters of bchars, not ending in a space.
    assert all(re.fullmatch(r"[0-9A-Za-z'()+_,\-./:=?]{70}", b) for b in boundaries)


Read = tuple[int, str, bool]  # (part, how, on the event loop)


def recording(
    bodies: list[bytes],
    reads: list[Read],
    not_in_memory: int,
    mappings: dict[int, memoryview] | None = None,
) -> Callable[[int], Fill]:
    """Fills of bodies that record each read in reads; part not_in_memory is not in memory
    (neither read from memory nor mapped); with mappings, each part can be mapped to its view
    there. Called on the event loop's thread."""
    loop_thread = threading.get_ident()  # asyncio.run runs the loop in this thread

    def source(i: int) -> Fill:
        def fill(view: memoryview) -> None:
            reads.append((i, "fill", threading.get_ident() == loop_thread))
            view[:] = bodies[i]

        def cached(view: memoryview) -> bool:
            reads.append((i, "cached", threading.get_ident() == loop_thread))
            if i == not_in_memory:
                return False
            view[:] = bodies[i]
            return True

        def mapped() -> memoryview | None:
            reads.append((i, "mapped", threading.get_ident() == loop_thread))
            return None if i == not_in_memory else cast(dict, mappings)[i]

        return Fill(fill, cached, None if mappings is None else mapped)

    return source


def parsed(body: bytes) -> list[bytes]:
    """The bodies of the parts of a multipart/related body with boundary BND."""
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: multipart/related; boundary=BND\r\n\r\n" + body
    )
    return [p.get_payload(decode=True) for p in msg.iter_parts()]


def test_fills_in_memory_are_read_on_the_event_loop_until_one_is_not() -> None:
    """Parts whose bytes are in memory are read on the event loop (no thread hop); from the
    first that is not, every part is read in worker threads; the body is the same either way."""
    reads: list[Read] = []
    bodies = [bytes([65 + i]) * (600 << 10) for i in range(5)]  # one part per group
    source = recording(bodies, reads, not_in_memory=2)
    body = collect([("application/dicom", len(b), source(i)) for i, b in enumerate(bodies)])
    assert parsed(body) == bodies
    assert reads == [
        (0, "cached", True),
        (1, "cached", True),
        (2, "cached", True),
        (2, "fill", False),
        (3, "fill", False),
        (4, "fill", False),
    ]


def test_large_bodies_in_memory_are_sent_from_their_mapping_after_their_heads() -> None:
    """A body of MAP_MIN bytes or more that can be mapped goes out as the mapping itself (no
    copy into a buffer); smaller ones are read into their group's buffer; once a body cannot
    be mapped (not all in memory), it and the rest are read in worker threads."""
    # Groups (1 MiB at most): parts 0 and 1, then 2, then 3.
    big = 600 << 10
    assert big >= MAP_MIN
    bodies = [bytes([65 + i]) * size for i, size in enumerate((big, 1000, big, big))]
    mappings = {i: memoryview(b) for i, b in enumerate(bodies)}
    reads: list[Read] = []
    source = recording(bodies, reads, not_in_memory=2, mappings=mappings)
    parts = [("application/dicom", len(b), source(i)) for i, b in enumerate(bodies)]

    async def run() -> list[bytes | memoryview]:
        return [chunk async for chunk in write_parts("BND", parts)]

    chunks = asyncio.run(run())
    assert any(c is mappings[0] for c in chunks)  # sent as it is, not copied
    assert not any(c is mappings[3] for c in chunks)  # after part 2: read in a thread
    assert parsed(b"".join(chunks)) == bodies
    assert reads == [
        (0, "mapped", True),
        (1, "cached", True),
        (2, "mapped", True),
        (2, "fill", False),
        (3, "fill", False),
    ]
