"""The de-identified Part 10 file, written without re-encoding what de-identification left alone.

pydicom's writer spends ~12 us on each element, and copies the pixel data twice on the way; in
a 512x512 CT that was the largest single cost of intake. Here every element that is still a
RawDataElement after de-identification (it was read and never changed) is written as its tag,
VR and length followed by the very bytes that were read; everything else (the elements
de-identification replaced, every sequence, the file meta) goes through pydicom's own element
writer. The output is what ``dcmwrite`` gives for the same dataset (a test checks it byte for
byte), in pieces to hand to ``writev`` and the hash without joining them."""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_data_element, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR

Chunk = bytes | bytearray | memoryview

UNDEFINED_LENGTH = 0xFFFFFFFF
# PS3.5 7.1.2: VRs whose explicit-VR header has two reserved bytes and a 32-bit length.
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_SHORT_VRS = frozenset(
    {
        "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT",
        "PN", "SH", "SL", "SS", "ST", "TM", "UI", "UL", "US",
    }
)  # fmt: skip
_PREFIX = bytes(128) + b"DICM"
_GROUP_LENGTH = 0x00020000
# PS3.10 Table 7.1-1: the Type 1 file meta elements (the group length is written here).
_REQUIRED_META = frozenset({0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012})
# String VRs pydicom's writer pads to even length, and with what (PS3.5 6.2).
_PADDING = {
    **dict.fromkeys(("AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM"), b" "),
    **dict.fromkeys(("UC", "UR", "UT"), b" "),
    "UI": b"\0",
}


def _copyable(elem: RawDataElement, implicit: bool) -> bool:
    """Whether elem's bytes as read are its encoding in the output: a defined length, the
    output's encoding, and (explicit VR) a VR whose header this module writes. The caller
    passes no sequence: de-identification changes their items in place."""
    return (
        elem.value is not None
        and elem.length != UNDEFINED_LENGTH
        and elem.length == len(elem.value)
        and elem.is_little_endian
        and elem.is_implicit_VR == implicit
        and (implicit or elem.VR in _SHORT_VRS or (elem.VR in _LONG_VRS and elem.VR != "SQ"))
    )


def _header(elem: RawDataElement | DataElement, implicit: bool, length: int) -> bytes:
    tag = elem.tag
    if implicit:
        return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, length)
    vr = elem.VR
    if vr in _LONG_VRS:
        return struct.pack("<HH2s2xL", tag >> 16, tag & 0xFFFF, vr.encode(), length)
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length)


def _ascii_string(elem: DataElement, implicit: bool, one_charset: bool) -> bytes | None:
    """The encoding of an element holding one ASCII string, as pydicom's writer gives it
    (the value, padded to even length), or None for anything else. With a single character
    set every one DICOM names encodes ASCII as ASCII; code extensions go through pydicom."""
    value = elem.value
    padding = _PADDING.get(elem.VR)  # type: ignore[arg-type]
    if padding is None or not isinstance(value, str) or not value.isascii():
        return None
    if not one_charset and elem.VR in CUSTOMIZABLE_CHARSET_VR:
        return None
    data = value.encode("ascii")
    if len(data) % 2:
        data += padding
    if not implicit and elem.VR not in _LONG_VRS and len(data) > 0xFFFF:
        return None  # pydicom writes it as UN (PS3.5 6.2.2)
    return _header(elem, implicit, len(data)) + data


def encode(ds: Dataset, raw: dict[int, RawDataElement]) -> list[Chunk]:
    """The Part 10 file of ds in pieces: zeroed preamble, file meta, then the data set in the
    transfer syntax its file meta names. raw holds the elements of ds that are unchanged since
    they were read (a snapshot taken before their values were converted)."""
    tsyntax = ds.file_meta.TransferSyntaxUID
    if tsyntax == DeflatedExplicitVRLittleEndian or not tsyntax.is_little_endian:
        return [_dcmwrite(ds)]
    implicit = tsyntax.is_implicit_VR
    if ds.original_encoding != (implicit, True):
        # Read in another encoding than its transfer syntax says: pydicom re-encodes it all.
        return [_dcmwrite(ds)]
    if ds.original_character_set != ds._character_set:
        return [_dcmwrite(ds)]

    chunks: list[Chunk] = [_PREFIX, _file_meta(ds.file_meta)]

    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, implicit
    encoding = ds.get("SpecificCharacterSet", "iso8859")
    one_charset = len(convert_encodings(encoding)) == 1
    for tag in sorted(ds._dict):
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue  # PS3.5 7.2: retired group lengths are not written
        elem = raw.get(tag)
        if elem is not None and _copyable(elem, implicit):
            if out.tell():
                chunks.append(out.getvalue())
                out = DicomBytesIO()
                out.is_little_endian, out.is_implicit_VR = True, implicit
            chunks.append(_header(elem, implicit, elem.length))
            chunks.append(elem.value)
            continue
        converted = ds._dict[tag]
        if isinstance(converted, RawDataElement):
            converted = ds[tag]
        if not implicit and converted.VR and len(converted.VR) != 2:
            return [_dcmwrite(ds)]  # an ambiguous VR ('US or SS'): pydicom resolves it
        text = _ascii_string(converted, implicit, one_charset)
        if text is not None:
            out.write(text)
        else:
            write_data_element(out, converted, encoding)
    if out.tell():
        chunks.append(out.getvalue())
    return chunks


def _file_meta(meta: Dataset) -> bytes:
    """The file meta group (PS3.10 7.1, explicit VR little endian) with its group length.
    Every element is one ASCII string or the version's two bytes once intake has set the meta
    (~0.3 ms in pydicom's writer for a handful of elements); anything else, and the checks
    that a meta without the required elements fails, are pydicom's."""
    body = []
    for tag in sorted(meta._dict):
        if tag == _GROUP_LENGTH:
            continue
        elem = meta[tag]
        value = elem.value
        if tag >> 16 != 2 or (tag in _REQUIRED_META and not value):
            break  # not file meta, or a required element empty: pydicom refuses it
        if elem.VR == "OB" and isinstance(value, bytes) and len(value) % 2 == 0:
            body.append(_header(elem, False, len(value)) + value)
            continue
        text = _ascii_string(elem, False, True)
        if text is None:
            break
        body.append(text)
    else:
        if meta._dict.keys() >= _REQUIRED_META:
            data = b"".join(body)
            return struct.pack("<HH2sHL", 2, 0, b"UL", 4, len(data)) + data
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_file_meta_info(out, meta, enforce_standard=True)  # type: ignore[arg-type]
    return out.getvalue()


def _dcmwrite(ds: Dataset) -> bytes:
    buf = BytesIO()
    dcmwrite(buf, ds)
    return buf.getvalue()
