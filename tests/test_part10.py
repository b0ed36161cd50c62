"""The intake writer (curation/part10) writes unchanged elements from the bytes as read, and
its file is byte for byte what pydicom's dcmwrite makes of the same de-identified dataset."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import Dataset, Sequence, dcmread
from pydicom.dataelem import DataElement
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from carina.curation import intake, part10
from carina.curation.deid import Deidentifier, load_profile
from carina.curation.pseudonyms import Pseudonymizer
from tests.factory import Phi, ct_instance, to_bytes

KEY = b"part10-test-key-" * 2


def _deidentified(data: bytes) -> tuple[Dataset, dict]:
    """What intake's worker has in hand before writing: read, de-identified, file meta set."""
    ds, snapshot = intake._read(data)
    Deidentifier(load_profile("basic", ("retain_long_modified_dates",)), Pseudonymizer(KEY)).apply(
        ds
    )
    intake._prepare_file_meta(ds)
    return ds, intake._unchanged(ds, snapshot)


def _dcmwrite(ds: Dataset) -> bytes:
    buf = BytesIO()
    dcmwrite(buf, ds)
    return buf.getvalue()


def _rich_ct() -> Dataset:
    """A CT with nested sequences, a private block, a retired group length, a kept DS written
    with odd spacing, multi-valued strings, a known attribute sent as UN and a sender's own
    file meta elements."""
    ds = ct_instance(Phi(), 1, rows=32, columns=32)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.add_new(0x00180050, "DS", " 2.50")  # SliceThickness: kept, spelled oddly on purpose
    ds.add_new(0x00180000, "UL", 0)  # a retired group length: never written
    ds.ReferencedImageSequence = Sequence([Dataset()])
    ds.ReferencedImageSequence[0].ReferencedSOPClassUID = ds.SOPClassUID
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4.5"
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "private text")
    ds[0x00081030] = DataElement(0x00081030, "UN", b"STUDY DESC")
    ds.ConvolutionKernel = "B30f"
    ds.file_meta.SourceApplicationEntityTitle = "SENDER"
    ds.file_meta.PrivateInformationCreatorUID = "1.2.3.4"
    ds.file_meta.PrivateInformation = b"odd"  # padded by pydicom's writer
    return ds


def _implicit(ds: Dataset) -> Dataset:
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def _rle(ds: Dataset) -> Dataset:
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x00" * 64, b"\x01" * 64])
    ds["PixelData"].VR = "OB"
    ds.NumberOfFrames = 2
    return ds


def _charset(ds: Dataset, charset: str | list[str]) -> Dataset:
    ds.SpecificCharacterSet = charset
    ds.ConvolutionKernel = "B30f"  # kept, so written as read
    return ds


CASES = {
    "explicit CT": lambda: ct_instance(Phi(), 1, rows=128, columns=128),
    "implicit CT": lambda: _implicit(ct_instance(Phi(), 2)),
    "rich explicit": _rich_ct,
    "rich implicit": lambda: _implicit(_rich_ct()),
    "encapsulated": lambda: _rle(ct_instance(Phi(), 3)),
    "utf-8": lambda: _charset(ct_instance(Phi(), 4), "ISO_IR 192"),
    "code extensions": lambda: _charset(ct_instance(Phi(), 5), ["", "ISO 2022 IR 87"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_is_what_dcmwrite_writes(case: str) -> None:
    ds, unchanged = _deidentified(to_bytes(CASES[case]()))
    expected = _dcmwrite(ds)
    assert b"".join(part10.encode(ds, unchanged)) == expected
    # And it reads back as the same data set.
    assert dcmread(BytesIO(expected)) == dcmread(BytesIO(b"".join(part10.encode(ds, unchanged))))


def test_pixel_data_is_the_bytes_as_read_not_a_copy() -> None:
    data = to_bytes(ct_instance(Phi(), 1, rows=256, columns=256))
    ds, unchanged = _deidentified(data)
    chunks = part10.encode(ds, unchanged)
    pixels = unchanged[0x7FE00010].value
    assert any(chunk is pixels for chunk in chunks)
    assert len(chunks) > 3  # unchanged runs are spliced in, not re-encoded


def test_unchanged_excludes_what_deidentification_touched() -> None:
    ds, unchanged = _deidentified(to_bytes(_rich_ct()))
    names = {ds[tag].keyword for tag in unchanged}
    assert {"Rows", "PixelData", "SliceThickness", "ImageType", "ConvolutionKernel"} <= names
    touched = {"PatientName", "PatientID", "StudyInstanceUID", "SOPInstanceUID", "StudyDate"}
    assert not names & touched
    assert "ReferencedImageSequence" not in names  # sequences are always re-encoded
    # Sent as UN, converted to its dictionary VR (LO): written with that VR, not spliced.
    assert 0x00081030 not in unchanged


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_other_encodings_go_through_dcmwrite(syntax: str) -> None:
    source = ct_instance(Phi(), 1)
    source.file_meta.TransferSyntaxUID = syntax
    ds, unchanged = _deidentified(to_bytes(source))
    chunks = part10.encode(ds, unchanged)
    assert chunks == [_dcmwrite(ds)]
