"""Instances sent as DICOM JSON metadata plus bulk data (PS3.18 10.5.1.2, Annex F), made into
the PS3.10 files the intake takes, so they are checked, de-identified, stored and indexed by
exactly the code a Part 10 instance goes through."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian

from .errors import InstanceRefused

# PS3.4 Annex B.2.3 / PS3.18 Table 10.5.3-2 (the intake uses the same codes).
CANNOT_UNDERSTAND = 0xC000
DOES_NOT_MATCH = 0xA900
PIXEL_DATA = "7FE00010"


@dataclass(frozen=True)
class BulkData:
    """The parts sent under one Content-Location: one value, or (compressed pixel data) one
    frame per part; transfer_syntax is what their media type says, None for native data."""

    values: tuple[bytes, ...]
    transfer_syntax: str | None


def bulk_data_uris(instance: object) -> Iterator[str]:
    """Every BulkDataURI of a DICOM JSON object, nested sequence items included."""
    if isinstance(instance, dict):
        for key, value in instance.items():
            if key == "BulkDataURI" and isinstance(value, str):
                yield value
            else:
                yield from bulk_data_uris(value)
    elif isinstance(instance, list):
        for item in instance:
            yield from bulk_data_uris(item)


def part10(instance: object, bulk: Mapping[str, BulkData]) -> bytes:
    """The PS3.10 file of one DICOM JSON instance whose BulkDataURIs are keys of bulk (checked
    by the caller). Its transfer syntax is the one the Pixel Data part's media type names,
    Explicit VR Little Endian without one (PS3.18 8.7.3.4); group 0002 in the metadata is
    ignored, the file meta is made here. InstanceRefused when it cannot be made."""
    if not isinstance(instance, dict) or not all(isinstance(v, dict) for v in instance.values()):
        raise InstanceRefused(CANNOT_UNDERSTAND, "metadata item is not a DICOM JSON object")
    instance = {k: v for k, v in instance.items() if not k.startswith("0002")}
    pixels = instance.get(PIXEL_DATA, {}).get("BulkDataURI")
    pixel_part = bulk.get(pixels) if isinstance(pixels, str) else None
    syntax = UID(pixel_part.transfer_syntax or ExplicitVRLittleEndian) if pixel_part else None
    syntax = syntax or ExplicitVRLittleEndian
    if not syntax.is_little_endian:
        raise InstanceRefused(CANNOT_UNDERSTAND, f"bulk data in {syntax} is not little endian")

    def value(tag: str, vr: str, uri: str) -> bytes:
        part = bulk[uri]
        if tag == PIXEL_DATA and part is pixel_part and syntax.is_encapsulated:
            return encapsulate(list(part.values))  # PS3.18 8.7.3.3.2: one frame per part
        if len(part.values) != 1 or part.transfer_syntax not in (None, *_NATIVE):
            raise InstanceRefused(
                CANNOT_UNDERSTAND, f"bulk data of ({tag[:4]},{tag[4:]}) must be one native part"
            )
        return part.values[0]

    try:
        ds = Dataset.from_json(instance, value)
    except InstanceRefused:
        raise
    except Exception as e:  # pydicom's messages may quote a value: name the kind only
        raise InstanceRefused(
            CANNOT_UNDERSTAND, f"not a DICOM JSON instance: {type(e).__name__}"
        ) from e
    if _has_non_ascii(instance):
        # PS3.18 F.2: DICOM JSON strings are Unicode, whatever SpecificCharacterSet says; a
        # character the declared set cannot hold would be written as "?". UTF-8 holds all.
        ds.SpecificCharacterSet = "ISO_IR 192"
    if syntax.is_encapsulated and "PixelData" in ds:
        _check_frames(ds, len(pixel_part.values) if pixel_part else 0)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    return _write(ds, syntax)


_NATIVE = (ExplicitVRLittleEndian, "1.2.840.10008.1.2")


def _has_non_ascii(value: object) -> bool:
    """Whether any string in a DICOM JSON value is not plain ASCII."""
    if isinstance(value, str):
        return not value.isascii()
    if isinstance(value, dict):
        return any(_has_non_ascii(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_non_ascii(v) for v in value)
    return False


def _check_frames(ds: Dataset, parts: int) -> None:
    """Compressed frames arrive one per part: as many parts as NumberOfFrames says."""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as e:
        raise InstanceRefused(DOES_NOT_MATCH, "NumberOfFrames is not a number") from e
    if frames != parts:
        raise InstanceRefused(
            DOES_NOT_MATCH, f"{frames} frames but {parts} compressed pixel data parts"
        )


def _write(ds: Dataset, syntax: UID) -> bytes:
    """ds as a PS3.10 file in syntax (the intake rewrites the meta with its own)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    for source, target in (
        ("SOPClassUID", "MediaStorageSOPClassUID"),
        ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
    ):
        if isinstance(ds.get(source), str) and ds.get(source):
            setattr(meta, target, ds.get(source))
    ds.file_meta = meta
    ds.preamble = bytes(128)
    out = BytesIO()
    try:
        dcmwrite(out, ds)
    except Exception as e:
        raise InstanceRefused(
            CANNOT_UNDERSTAND, f"cannot encode the instance: {type(e).__name__}"
        ) from e
    return out.getvalue()
