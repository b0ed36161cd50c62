"""The intake worker function on its own: what it refuses, and what it produces."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset

from carina.curation import intake
from carina.curation.deid import Deidentifier, load_profile
from carina.curation.intake import (
    BULK_THRESHOLD,
    CANNOT_UNDERSTAND,
    COERCED,
    DISCARDED,
    InstanceRecord,
    IntakeContext,
    PartSink,
    Refusal,
    _bulk_uri_handler,
    _coercion,
    _read,
    dicom_json,
    process_part,
)
from carina.curation.pseudonyms import Pseudonymizer
from tests.factory import Phi, ct_instance, to_bytes
from tests.pagecache import dirty_pages, require_page_flags


@pytest.fixture
def ctx(tmp_path: Path) -> IntakeContext:
    return IntakeContext(
        "default", b"k" * 32, "basic", ("retain_long_modified_dates",), str(tmp_path)
    )


def test_file_cut_at_any_point_is_never_stored(ctx: IntakeContext) -> None:
    data = to_bytes(ct_instance(Phi(), 1, rows=16, columns=16))
    stored = []
    for cut in range(0, len(data), 5):
        outcome = process_part(data[:cut], ctx)
        if isinstance(outcome, InstanceRecord):
            stored.append(cut)
        else:
            assert outcome.reason
    assert stored == []
    assert isinstance(process_part(data, ctx), InstanceRecord)


def test_staged_file_is_sent_to_disk_at_once_only_when_the_context_asks(
    ctx: IntakeContext, tmp_path: Path
) -> None:
    require_page_flags(tmp_path)
    data = to_bytes(ct_instance(Phi(), 1, rows=512, columns=512))
    left = process_part(data, ctx)
    started = process_part(data, replace(ctx, write_back=True))
    assert isinstance(left, InstanceRecord) and isinstance(started, InstanceRecord)
    dirty, pages = dirty_pages(Path(left.staging_path))
    assert pages > 100 and dirty == pages  # the store's flush will write it all
    assert dirty_pages(Path(started.staging_path))[0] == 0  # on its way already


def test_trailing_garbage_after_dataset_is_refused(ctx: IntakeContext) -> None:
    data = to_bytes(ct_instance(Phi(), 1, rows=16, columns=16))
    outcome = process_part(data + b"\x00\x01\x02", ctx)
    assert isinstance(outcome, Refusal)
    assert outcome.code == CANNOT_UNDERSTAND


def test_refused_part_leaves_no_staged_file(ctx: IntakeContext) -> None:
    process_part(b"not dicom", ctx)
    assert not any(Path(ctx.staging_dir).iterdir())


def test_spooled_payload_file_is_removed_after_processing(
    ctx: IntakeContext, tmp_path: Path
) -> None:
    spool = tmp_path / "part.dcm"
    spool.write_bytes(to_bytes(ct_instance(Phi(), 1, rows=16, columns=16)))
    outcome = process_part(str(spool), ctx)
    assert isinstance(outcome, InstanceRecord)
    assert not spool.exists()
    assert Path(outcome.staging_path).is_file()


def test_record_carries_only_deidentified_values(ctx: IntakeContext) -> None:
    phi = Phi()
    outcome = process_part(to_bytes(ct_instance(phi, 1, rows=16, columns=16)), ctx)
    assert isinstance(outcome, InstanceRecord)
    text = repr(outcome) + Path(outcome.staging_path).read_bytes().decode("latin-1")
    for s in phi.strings():
        assert s not in text


def test_written_file_has_carina_meta_and_a_zeroed_preamble(ctx: IntakeContext) -> None:
    ds = ct_instance(Phi(), 1, rows=16, columns=16)
    ds.preamble = b"II*\x00" + b"PATIENT SMITH" + bytes(111)  # a TIFF-style preamble
    outcome = process_part(to_bytes(ds), ctx)
    assert isinstance(outcome, InstanceRecord)
    written = Path(outcome.staging_path).read_bytes()
    assert written[:128] == bytes(128)
    assert written[128:132] == b"DICM"
    from pydicom import dcmread

    meta = dcmread(outcome.staging_path).file_meta
    assert meta.MediaStorageSOPInstanceUID == outcome.sop_uid
    assert meta.ImplementationClassUID == "2.25.238593742924346191678535099119690636885"
    # (0002,0000) UL is 12 bytes; its value must end the meta group exactly where the
    # dataset's first element (group 0008) starts.
    assert written[132:136] == b"\x02\x00\x00\x00"
    group_length = int.from_bytes(written[140:144], "little")
    assert group_length == meta.FileMetaInformationGroupLength
    first_dataset_group = int.from_bytes(written[144 + group_length : 146 + group_length], "little")
    assert first_dataset_group == 0x0008


def test_only_top_level_bulk_data_is_addressable(ctx: IntakeContext) -> None:
    """A nested binary value must not get the URI of the top-level PixelData."""
    import json

    from pydicom import Dataset, Sequence

    ds = ct_instance(Phi(), 1, rows=64, columns=64)
    lut = Dataset()  # a Modality LUT: kept by the profile, its LUTData big enough to be bulk
    lut.LUTDescriptor = [4096, 0, 16]
    lut.ModalityLUTType = "HU"
    lut.add_new(0x00283006, "OW", bytes(8192))  # LUTData
    ds.ModalityLUTSequence = Sequence([lut])
    outcome = process_part(to_bytes(ds), ctx)
    assert isinstance(outcome, InstanceRecord)
    meta = json.loads(outcome.metadata)
    assert meta["7FE00010"]["BulkDataURI"] == "bulkdata/7FE00010"
    nested = meta["00283000"]["Value"][0]["00283006"]["BulkDataURI"]
    assert nested != "bulkdata/00283006"
    assert not nested.startswith("bulkdata/7FE00010")


def test_deidentified_instance_carries_the_coercion_warning(ctx: IntakeContext) -> None:
    outcome = process_part(to_bytes(ct_instance(Phi(), 1, rows=16, columns=16)), ctx)
    assert isinstance(outcome, InstanceRecord)
    assert outcome.warning == COERCED


def test_coercion_says_changed_removed_or_untouched() -> None:
    data = to_bytes(ct_instance(Phi(), 1, rows=16, columns=16))
    ds, snapshot = _read(data)
    read = frozenset(ds._dict)
    assert _coercion(ds, read, snapshot) == 0
    del ds.AccessionNumber
    assert _coercion(ds, read, snapshot) == DISCARDED
    ds.PatientName = "RESEARCH^0001"
    assert _coercion(ds, read, snapshot) == COERCED
    ds, snapshot = _read(data)
    ds.PatientIdentityRemoved = "YES"  # added
    assert _coercion(ds, read, snapshot) == COERCED


def _pydicom_json(ds: Dataset) -> dict:
    return ds.to_json_dict(BULK_THRESHOLD, _bulk_uri_handler(ds), suppress_invalid_tags=True)


@pytest.mark.parametrize("deidentified", [False, True])
def test_index_json_is_what_pydicom_writes(deidentified: bool) -> None:
    """The intake's own DICOM JSON writer (its fast path for single values) gives exactly
    pydicom's to_json_dict, over pydicom's test files (sequences, PN, AT, IS/DS, binary
    values, private and empty elements, several character sets) and a generated CT."""
    files = [Path(p).read_bytes() for p in get_testdata_files("*.dcm")]
    files.append(to_bytes(ct_instance(Phi(), 1, rows=16, columns=16)))
    profile = load_profile("basic", ("retain_long_modified_dates",))
    compared = 0
    for data in files:
        try:
            ds, _ = _read(data)
            if deidentified:
                Deidentifier(profile, Pseudonymizer(b"k" * 32)).apply(ds)
        except Exception:  # files intake refuses, or deid cannot apply to: not indexed
            continue
        assert json.dumps(dicom_json(ds), sort_keys=True) == json.dumps(
            _pydicom_json(ds), sort_keys=True
        )
        compared += 1
    assert compared > 40


def test_part_sink_keeps_every_byte_even_of_a_buffer_reused_by_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunk = bytes(range(256)) * 64
    reused = bytearray(b"abcd")
    sink = PartSink(tmp_path)
    sink.write(memoryview(chunk)[10:1000])
    sink.write(memoryview(reused))
    reused[:] = b"XXXX"  # python-multipart hands out slices of buffers it reuses
    sink.write(chunk)
    assert sink.finish() == chunk[10:1000] + b"abcd" + chunk

    monkeypatch.setattr(intake, "SPOOL_THRESHOLD", 5000)
    sink = PartSink(tmp_path)
    for start in range(0, len(chunk), 3000):
        sink.write(memoryview(chunk)[start : start + 3000])
    spooled = sink.finish()
    assert isinstance(spooled, str) and Path(spooled).read_bytes() == chunk
    Path(spooled).unlink()
    sink = PartSink(tmp_path)
    sink.write(chunk)
    sink.discard()
    assert list(tmp_path.iterdir()) == []


def test_values_are_converted_as_pydicom_converts_them() -> None:
    """_read's own conversion of plain string values (UI, CS, dates...) gives what pydicom's
    gives: same VR, same type, same value, multi-valued ones included."""
    compared = 0
    for path in get_testdata_files("*.dcm"):
        data = Path(path).read_bytes()
        try:
            ours, _ = _read(data)
        except intake.InstanceRefused:
            continue  # a sample intake refuses (truncated, no meta, ...)
        theirs = dcmread(path, force=True)
        for tag in ours._dict:
            mine, pydicoms = ours._dict[tag], theirs[tag]
            assert (mine.VR, type(mine.value), mine.value) == (
                pydicoms.VR,
                type(pydicoms.value),
                pydicoms.value,
            ), (path, tag)
            compared += mine.VR in ("AS", "CS", "DA", "DT", "TM", "UI")
    assert compared > 1000
