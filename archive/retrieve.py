"""Retrieval of parts of a stored instance without decoding it: the byte ranges of frames
(PS3.18 10.4, Frames resource) and of top-level bulk data elements, read straight from the
object store."""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from cachetools import LRUCache
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_encoder, pixel_array
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .errors import ArchiveError, NotFound, StorageError
from .storage import CHUNK, RWF_NOWAIT, FilesystemStore, ObjectStore, check_key

# Native encodings whose element values are little-endian bytes as PS3.18 8.7.3.3.1 wants for
# application/octet-stream; big endian and deflated objects would need transcoding.
NATIVE_LITTLE_ENDIAN = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloat...
# Values longer than this are skipped (not read into memory) while the header is parsed.
DEFER_SIZE = 1024
# Objects that cannot be read by range (S3) are spooled; up to this size in memory.
SPOOL_IN_MEMORY = 16 << 20
_FRAME_NUMBER = re.compile(r"[0-9]+")
# PS3.18 Table 8.7.3-5: the media type of each compressed transfer syntax's frames. A frame
# stored in one of these is served as stored in its media type.
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "image/jpeg",  # JPEG Extended
    "1.2.840.10008.1.2.4.57": "image/jpeg",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": "image/jpeg",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.5": "image/dicom-rle",  # RLE Lossless
    "1.2.840.10008.1.2.4.80": "image/jls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "image/jls",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "image/jp2",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "image/jp2",  # JPEG 2000
    "1.2.840.10008.1.2.4.92": "image/jpx",  # JPEG 2000 Part 2 Lossless
    "1.2.840.10008.1.2.4.93": "image/jpx",  # JPEG 2000 Part 2
    "1.2.840.10008.1.2.4.201": "image/jphc",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "image/jphc",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "image/jphc",  # HTJ2K
}


class InvalidRequest(ArchiveError):
    """The request names frames or elements the instance cannot have (bad number, no pixels)."""


class NotRetrievable(ArchiveError):
    """The stored form cannot be served as asked without transcoding (compressed, big endian,
    frames not on byte boundaries)."""


class WouldBlock(ArchiveError):
    """A StoredObject opened with nowait was asked for bytes that are not all in memory (the
    page cache) yet, or cannot be read without blocking at all; read them in a worker thread."""


@dataclass(frozen=True)
class ByteRange:
    """Where a value lies in the stored object."""

    offset: int
    length: int


class StoredObject:
    """A stored instance opened for reading by offset (a local file, or a spooled copy)."""

    def __init__(self, store: ObjectStore, key: str, *, nowait: bool = False) -> None:
        # nowait: for an event loop, which must not wait for a disk. Reads by offset then
        # take only what is in the page cache (RWF_NOWAIT, Linux 4.14) and raise WouldBlock
        # for anything else.
        if nowait and (RWF_NOWAIT is None or not isinstance(store, FilesystemStore)):
            raise WouldBlock("this object store is read in a worker thread")
        self._file = _open(store, key)
        self._fd = self._file.fileno() if isinstance(store, FilesystemStore) else None
        self._flags = RWF_NOWAIT if nowait and RWF_NOWAIT else 0

    def __enter__(self) -> StoredObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file."""
        self._file.close()

    @property
    def nowait(self) -> bool:
        """Whether reads that would wait for the disk raise WouldBlock instead."""
        return bool(self._flags)

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill view with the bytes at offset."""
        if self._fd is None:
            self._file.seek(offset)
            if self._file.readinto(view) != len(view):  # type: ignore[attr-defined]
                raise StorageError("stored object is shorter than its header says")
            return
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self._fd, [view[done:]], offset + done, self._flags)
            except BlockingIOError:
                raise WouldBlock("not in the page cache") from None
            if n < len(view) - done and self._flags:
                raise WouldBlock("not all in the page cache")  # or past the end: see there
            if not n:
                raise StorageError("stored object is shorter than its header says")
            done += n

    @property
    def file(self) -> BinaryIO:
        """The seekable file itself, for readers that take one (pydicom's frame decoding)."""
        return self._file

    def header(self, *, with_pixels: bool) -> RawDataset:
        """The dataset with every long value left unread (value offsets kept)."""
        self._file.seek(0)
        try:
            ds = dcmread(self._file, defer_size=DEFER_SIZE, stop_before_pixels=not with_pixels)
        except (InvalidDicomError, EOFError, ValueError) as e:
            raise StorageError(f"stored object cannot be parsed: {type(e).__name__}") from e
        return RawDataset(ds)

    def read(self, r: ByteRange, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The bytes of r, in chunks."""
        self._file.seek(r.offset)
        left = r.length
        while left > 0:
            data = self._file.read(min(chunk_size, left))
            if not data:
                raise StorageError("stored object is shorter than its header says")
            left -= len(data)
            yield data


class RawDataset:
    """A header parsed with deferred values: element positions, and small values decoded."""

    def __init__(self, ds: object) -> None:
        self._ds = ds

    def element(self, tag: int) -> ByteRange:
        """Where the value of top-level element tag lies; NotFound if absent or a sequence."""
        elem = self._ds.get_item(Tag(tag), keep_deferred=True)  # type: ignore[attr-defined]
        if not isinstance(elem, RawDataElement):
            raise NotFound(f"no element {tag:08X}")
        if elem.length == 0xFFFFFFFF or elem.VR == "SQ":
            # Sequences and encapsulated pixel data have no single value to return.
            raise NotRetrievable(f"element {tag:08X} has no single value (undefined length)")
        return ByteRange(elem.value_tell, elem.length)

    def int_value(self, keyword: str, default: int | None = None) -> int:
        """An integer attribute of the header."""
        value = self._ds.get(keyword)  # type: ignore[attr-defined]
        if value in (None, ""):
            if default is None:
                raise InvalidRequest(f"the instance has no {keyword}")
            return default
        return int(value)

    def encapsulated_pixels(self) -> int:
        """Where the encapsulated Pixel Data's items (its Basic Offset Table first) start."""
        elem = self._ds.get_item(Tag(0x7FE00010), keep_deferred=True)  # type: ignore[attr-defined]
        if elem is None:
            raise InvalidRequest("the instance has no pixel data")
        if not isinstance(elem, RawDataElement) or elem.length != 0xFFFFFFFF:
            raise StorageError("stored pixel data is not encapsulated as its syntax says")
        return int(elem.value_tell)

    def text(self, keyword: str) -> str:
        """A string attribute of the header ("" when absent)."""
        return str(self._ds.get(keyword) or "")  # type: ignore[attr-defined]

    def has(self, tag: int) -> bool:
        """Whether a top-level element is present."""
        return Tag(tag) in self._ds  # type: ignore[operator]


def parse_frame_list(text: str) -> list[int]:
    """The 1-based frame numbers of a comma-separated frame list, in the order given."""
    numbers: list[int] = []
    for item in text.split(","):
        item = item.strip()
        # PS3.18 (2017b 6.5.4, RetrieveFrames): one or more non-duplicate frame numbers, in
        # any order; frames are numbered from 1 (PS3.3 C.7.6.6).
        if not _FRAME_NUMBER.fullmatch(item) or int(item) < 1:
            raise InvalidRequest(f"frame number {item!r} is not a positive integer")
        n = int(item)
        if n in numbers:
            raise InvalidRequest(f"frame {n} is listed twice")
        numbers.append(n)
    return numbers


@dataclass(frozen=True)
class PixelLayout:
    """Where the native frames of an instance lie: its pixel data value, the size of one
    frame and how many there are."""

    pixels: ByteRange
    frame_size: int
    frames: int

    def ranges(self, numbers: list[int]) -> list[ByteRange]:
        """Where each requested frame's bytes lie, in the order requested."""
        _check_numbers(numbers, self.frames)
        start, size = self.pixels.offset, self.frame_size
        return [ByteRange(start + (n - 1) * size, size) for n in numbers]


def pixel_layout(obj: StoredObject, transfer_syntax: str) -> PixelLayout:
    """Where the native little-endian frames of obj lie, from its header."""
    ts = UID(transfer_syntax)
    if ts not in NATIVE_LITTLE_ENDIAN:
        raise NotRetrievable(
            f"the instance is stored as {ts.name or ts}; frames are served only from native "
            "little-endian pixel data (no transcoding yet)"
        )
    ds = obj.header(with_pixels=True)
    tag = next((t for t in PIXEL_TAGS if ds.has(t)), None)
    if tag is None:
        raise InvalidRequest("the instance has no pixel data")
    pixels = ds.element(tag)
    frames = ds.int_value("NumberOfFrames", 1)
    bits = (
        ds.int_value("Rows")
        * ds.int_value("Columns")
        * ds.int_value("SamplesPerPixel", 1)
        * ds.int_value("BitsAllocated")
    )
    if bits % 8:
        # PS3.5 8.1.1: 1-bit frames are packed back to back, so a frame may start mid-byte.
        raise NotRetrievable("frames that do not start on a byte boundary are not supported")
    size = bits // 8
    if frames * size > pixels.length:
        raise StorageError("stored pixel data is shorter than Number of Frames says")
    return PixelLayout(pixels, size, frames)


def frame_ranges(obj: StoredObject, transfer_syntax: str, numbers: list[int]) -> list[ByteRange]:
    """Where each requested frame's native pixel bytes lie, in the order requested."""
    return pixel_layout(obj, transfer_syntax).ranges(numbers)


# Pixel layouts of recently read instances, by (object key, content digest): a viewer reads a
# series frame by frame, often more than once, and the header need not be parsed each time.
# A rewritten object (redaction) has another digest, so it is never answered from here.
LAYOUT_CACHE_SIZE = 65536
_layouts: LRUCache[Hashable, PixelLayout] = LRUCache(LAYOUT_CACHE_SIZE)
_layouts_lock = threading.Lock()


def cached_layout(
    obj: StoredObject,
    transfer_syntax: str,
    version: Hashable,
    size: int | None = None,
    geometry: tuple[str | None, ...] = (),
) -> PixelLayout:
    """pixel_layout of obj, remembered under version (its object key and content digest);
    found from size and geometry (tail_layout) where they place it, else by parsing."""
    with _layouts_lock:
        found = _layouts.get(version)
    if found is None:
        tail = tail_layout(obj, transfer_syntax, size, geometry) if size else None
        if tail is None and obj.nowait:
            raise WouldBlock("the header is parsed in a worker thread")
        found = tail or pixel_layout(obj, transfer_syntax)
        with _layouts_lock:
            _layouts[version] = found
    return found


_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian


def tail_layout(
    obj: StoredObject, transfer_syntax: str, size: int, geometry: tuple[str | None, ...]
) -> PixelLayout | None:
    """The layout of native Pixel Data that is the object's last element (as Carina and most
    writers store it), from the object's size and its geometry as indexed (Rows, Columns,
    Samples per Pixel, Bits Allocated, Number of Frames: index.GEOMETRY_TAGS), checked against
    the element header that must then precede the value: tag, VR (explicit VR) and exactly
    that length, running to the end of the file. One small read instead of parsing the header;
    None when the object is not so (the caller parses it)."""
    if transfer_syntax not in NATIVE_LITTLE_ENDIAN or len(geometry) != 5:
        return None
    try:
        rows, columns, samples, bits, frames = (
            int(v) if v is not None else d for v, d in zip(geometry, (0, 0, 1, 0, 1), strict=True)
        )
    except ValueError:
        return None
    frame_bits = rows * columns * samples * bits
    if frame_bits <= 0 or frame_bits % 8 or frames < 1:
        return None
    length = frames * frame_bits // 8
    length += length % 2  # PS3.5 7.1.1: values have even lengths (padded)
    explicit = transfer_syntax == ExplicitVRLittleEndian
    head = 12 if explicit else 8
    start = size - length - head
    if start < 0:
        return None
    found = bytearray(head)
    try:
        obj.read_into(start, memoryview(found))
    except StorageError:
        return None  # shorter than indexed: the caller parses it and says what is wrong
    expected_length = length.to_bytes(4, "little")
    if explicit:
        ok = found[:4] == _PIXEL_DATA_TAG and found[4:8] in (b"OW\0\0", b"OB\0\0")
        ok = ok and found[8:] == expected_length
    else:
        ok = found == _PIXEL_DATA_TAG + expected_length
    if not ok:
        return None
    return PixelLayout(ByteRange(start + head, length), frame_bits // 8, frames)


def encapsulated_frames(obj: StoredObject, numbers: list[int]) -> list[bytes]:
    """The compressed bytes of each requested frame, as stored (fragments joined, no item
    delimiters: PS3.18 8.7.3.3.2), in the order requested."""
    ds = obj.header(with_pixels=True)
    start = ds.encapsulated_pixels()
    frames = ds.int_value("NumberOfFrames", 1)
    _check_numbers(numbers, frames)
    out = []
    for n in numbers:
        obj.file.seek(start)
        try:
            out.append(get_frame(obj.file, n - 1, number_of_frames=frames))
        except (ValueError, EOFError) as e:
            raise StorageError(f"stored pixel data cannot be split into frames: {e}") from e
    return out


def decoded_frames(obj: StoredObject, numbers: list[int]) -> list[bytes]:
    """Each requested frame of a compressed grey or palette image, decoded by pydicom to the
    native little-endian bytes application/octet-stream carries (PS3.18 Table 8.7.3-4).

    Only single-sample images: their decoded bytes mean what the instance's metadata says.
    Colour would change meaning (YBR_FULL_422 is subsampled when native, a decoder's planar
    configuration need not be the stored one), so it is NotRetrievable."""
    ds = obj.header(with_pixels=True)
    ds.encapsulated_pixels()
    return [
        arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        for arr in _grey_frames(obj, ds, numbers, "decoded to application/octet-stream")
    ]


def encoded_frames(obj: StoredObject, numbers: list[int], target: str) -> list[bytes]:
    """Each requested frame of a grey or palette image, decoded if stored compressed, then
    encoded by pydicom's encoder for target (a lossless compressed transfer syntax): the bytes
    of a frame in target's media type (PS3.18 8.7.3.3.2). NotRetrievable when the encoder
    refuses the image (JPEG-LS takes at most 16 bits, OpenJPEG needs sides of 32 pixels)."""
    ds = obj.header(with_pixels=True)
    arrays = _grey_frames(obj, ds, numbers, f"encoded as {UID(target).name}")
    image = {
        "rows": ds.int_value("Rows"),
        "columns": ds.int_value("Columns"),
        "samples_per_pixel": 1,
        "bits_allocated": ds.int_value("BitsAllocated"),
        "bits_stored": ds.int_value("BitsStored"),
        "pixel_representation": ds.int_value("PixelRepresentation", 0),
        "photometric_interpretation": ds.text("PhotometricInterpretation"),
        "number_of_frames": 1,
    }
    encoder = get_encoder(target)
    out = []
    for arr in arrays:
        try:
            out.append(encoder.encode(arr, **image))
        except (ValueError, RuntimeError, TypeError) as e:
            raise NotRetrievable(
                f"the frame cannot be encoded as {UID(target).name}: {type(e).__name__}"
            ) from e
    return out


def _grey_frames(
    obj: StoredObject, ds: RawDataset, numbers: list[int], what: str
) -> list[np.ndarray]:
    """The requested frames of a single-sample image as arrays (decoded if compressed)."""
    if ds.int_value("SamplesPerPixel", 1) != 1 or ds.int_value("BitsAllocated") % 8:
        raise NotRetrievable(
            f"only single-sample frames of whole bytes are {what} (no transcoding of colour "
            "or 1-bit frames yet)"
        )
    _check_numbers(numbers, ds.int_value("NumberOfFrames", 1))
    out = []
    for n in numbers:
        obj.file.seek(0)
        try:
            out.append(pixel_array(obj.file, index=n - 1, raw=True))
        except (ValueError, RuntimeError, NotImplementedError, AttributeError) as e:
            raise NotRetrievable(f"the frame cannot be decoded here ({type(e).__name__})") from e
    return out


def _check_numbers(numbers: list[int], frames: int) -> None:
    for n in numbers:
        # PS3.18 9.5.2 (the frameNumber rule of rendered retrieval, which frames follow here):
        # a number above the instance's Number of Frames is a Bad Request.
        if n > frames:
            raise InvalidRequest(f"frame {n} is out of range: the instance has {frames}")


def bulk_data_range(obj: StoredObject, transfer_syntax: str, tag: int) -> ByteRange:
    """Where the value of a top-level element lies, for the bulk data resource."""
    ts = UID(transfer_syntax)
    # Encapsulated syntaxes encode every element but the pixel data as Explicit VR Little
    # Endian (PS3.5 A.4), so those values are served as stored.
    encapsulated = ts.is_transfer_syntax and ts.is_encapsulated
    if ts not in NATIVE_LITTLE_ENDIAN and (tag in PIXEL_TAGS or not encapsulated):
        raise NotRetrievable(
            f"the instance is stored as {ts.name or ts}; this element cannot be served as "
            "application/octet-stream without transcoding"
        )
    return obj.header(with_pixels=tag >= 0x7FE00008).element(tag)


def _open(store: ObjectStore, key: str) -> BinaryIO:
    """A seekable file of the object: the file itself in a filesystem store, else a spooled
    copy (an object store without ranged reads in its interface yet)."""
    if isinstance(store, FilesystemStore):
        try:
            return open(store.root / check_key(key), "rb")  # noqa: SIM115 - caller closes
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise NotFound("no such object") from e
        except OSError as e:
            raise StorageError(f"object store failed: {e.strerror}") from e
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115
    try:
        for chunk in store.iter_chunks(key):
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    return spool  # type: ignore[return-value]
