"""Every row of PS3.15 Table E.1-1 (deid_profiles/table_e1_1.csv), checked against the engine.

The cases are generated from the CSV at import time: for the Basic Profile and for each option
overlay (basic + that one option), every row's attribute is planted with a VR-valid value, once at
the top level of a minimal dataset and once inside a kept sequence item (AnatomicRegionSequence,
which is not in the table), and the action the table names is asserted, per the semantics that
curation/deid.py documents. Masked rows get concrete sample tags. A tag newer than pydicom's
dictionary is planted with VR UN, as pydicom reads it from an implicit VR file."""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import DataElement, Dataset, Sequence, config
from pydicom.datadict import dictionary_VR
from pydicom.dataset import FileMetaDataset
from pydicom.valuerep import validate_value

from carina.curation import intake
from carina.curation.deid import OPTIONS, Deidentifier, Profile, load_profile
from carina.curation.errors import InstanceRefused, ProfileError
from carina.curation.pseudonyms import Pseudonymizer
from tests.factory import to_bytes

TABLE = Path(__file__).resolve().parent.parent / "deid_profiles" / "table_e1_1.csv"
KEY = b"table-test-key".ljust(32, b"k")
PATIENT_ID = "MRN-7734921"
PLANTED_NAME = "SMITHERSON^JOHANNA^Q"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
SOP_UID = "1.2.826.0.1.3680043.8.498.1002"
PLANTED_UID = "1.2.826.0.1.3680043.8.498.424242"
# Kept and recursed into: (0008,2218) is not in Table E.1-1.
CARRIER = 0x00082218
# Concrete samples for the masked rows (the engine must expand the masks itself).
MASK_SAMPLES = {
    "(50xx,xxxx)": (0x50000005, 0x50003000, 0x501E3000),
    "(60xx,3000)": (0x60003000, 0x60023000),
    "(60xx,4000)": (0x60004000,),
}
# Carina's own lines (deid_profiles/carina.dicom) override the table for these two.
CARINA_PSEUDONYMS = {0x00100020: "id", 0x00100010: "name"}
DATE_VRS = {"DA", "DT"}
EMPTY = (None, "", b"", [])

# A value valid for each VR, recognisable as planted.
PLANT: dict[str, object] = {
    "AE": "PLANTED_AE",
    "AS": "042Y",
    "AT": 0x00100010,
    "CS": "PLANTED",
    "DA": "20240117",
    "DS": "72.5",
    "DT": "20240117101500.123456",
    "FL": 1.5,
    "FD": 2.5,
    "IS": "42",
    "LO": "PLANTED SMITHERSON LO",
    "LT": "Planted long text about SMITHERSON",
    "PN": PLANTED_NAME,
    "SH": "PLANTED SH",
    "ST": "Planted short text about SMITHERSON",
    "TM": "101500",
    "UC": "PLANTED SMITHERSON UC",
    "UI": PLANTED_UID,
    "UR": "http://example.org/smitherson",
    "UT": "Planted unlimited text about SMITHERSON",
    "US": 7,
    "SS": -7,
    "UL": 70000,
    "SL": -70000,
    "SV": -7,
    "UV": 7,
}
BINARY = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


@dataclass(frozen=True)
class Row:
    """One row of Table E.1-1: its tag text, keyword and action code per column."""

    tag_text: str
    keyword: str
    codes: dict[str, str]

    def code(self, option: str | None) -> str:
        """The action for basic + option: the option's cell where it has one, else basic's."""
        if option and self.codes[option]:
            return self.codes[option]
        return self.codes["basic"]

    def tags(self) -> tuple[int, ...]:
        """The concrete tags to plant: the row's tag, or samples of its mask."""
        if self.tag_text in MASK_SAMPLES:
            return MASK_SAMPLES[self.tag_text]
        assert "x" not in self.tag_text.lower(), f"unhandled mask {self.tag_text}"
        return (int(self.tag_text[1:5] + self.tag_text[6:10], 16),)


def _read_table() -> list[Row]:
    with TABLE.open(newline="") as f:
        return [
            Row(r["tag"], r["keyword"], {c: r[c] for c in ("basic", *OPTIONS)})
            for r in csv.DictReader(f)
        ]


ROWS = _read_table()
PROFILES = [None, *OPTIONS]


def _vr(tag: int) -> str:
    """The dictionary VR (the first of several); UN for a tag pydicom does not know."""
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return "UN"


def _plant_element(tag: int, vr: str) -> DataElement:
    if vr == "SQ":
        item = Dataset()
        item.PatientName = PLANTED_NAME
        return DataElement(tag, "SQ", Sequence([item]))
    if vr in BINARY:
        return DataElement(tag, vr, b"PLANTED!")
    return DataElement(tag, vr, PLANT[vr])


def _profile(option: str | None) -> Profile:
    return load_profile("basic", (option,) if option else ())


def _minimal(sop_uid: str = SOP_UID) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.PatientID = PATIENT_ID
    ds.StudyInstanceUID = STUDY_UID
    ds.SOPInstanceUID = sop_uid
    return ds


def _planted(tag: int, vr: str, nested: bool, sop_uid: str = SOP_UID) -> Dataset:
    """A minimal dataset with the attribute planted at the top level or inside a kept item."""
    ds = _minimal(sop_uid)
    elem = _plant_element(tag, vr)
    if tag >> 16 == 0x0002 and not nested:
        # Group 0002 lives in the file meta, where (0002,0003) names the dataset's SOP instance.
        ds.file_meta[tag] = elem
        ds.SOPInstanceUID = elem.value
    elif nested:
        item = Dataset()
        item.CodeValue = "39607008"
        item[tag] = elem
        ds[CARRIER] = DataElement(CARRIER, "SQ", Sequence([item]))
    else:
        ds[tag] = elem
    return ds


def _deidentify(ds: Dataset, profile: Profile) -> Dataset:
    Deidentifier(profile, Pseudonymizer(KEY)).apply(ds)
    return ds


def _where(ds: Dataset, tag: int, nested: bool) -> Dataset:
    """The dataset the planted attribute was put in, after de-identification."""
    if nested:
        carrier = ds[CARRIER].value
        assert len(carrier) == 1 and carrier[0].CodeValue == "39607008", "carrier item lost"
        return carrier[0]
    return ds.file_meta if tag >> 16 == 0x0002 else ds


def _is_empty(value: object) -> bool:
    return value in EMPTY or (isinstance(value, Sequence) and len(value) == 0)


def _assert_vr_valid(vr: str, value: object) -> None:
    if vr in BINARY:
        assert isinstance(value, bytes) and len(value) % 2 == 0, value
        return
    if isinstance(value, str | bytes):
        validate_value(vr, value, config.RAISE)
    if vr == "DA":
        dt.datetime.strptime(str(value), "%Y%m%d")


def _shift(value: str, days: int) -> str:
    d = dt.date(int(value[:4]), int(value[4:6]), int(value[6:8])) - dt.timedelta(days=days)
    return d.strftime("%Y%m%d") + value[8:]


def _assert_item_cleaned(seq: object) -> None:
    """A kept sequence: its item is still there, the planted name inside it is not."""
    assert isinstance(seq, Sequence) and len(seq) == 1, "sequence or its item lost"
    name = seq[0].get("PatientName")
    assert name is None or str(name) != PLANTED_NAME, "PatientName inside a kept item survived"


def check_action(
    code: str,
    tag: int,
    vr: str,
    before: object,
    where: Dataset,
    profile: Profile,
    patient_id: str = PATIENT_ID,
) -> None:
    """Assert that the PS3.15 action `code` was applied to `tag` in `where`."""
    pseudo = Pseudonymizer(KEY)
    if tag in CARINA_PSEUDONYMS:
        # carina.dicom: a keyed pseudonym of the top-level PatientID, not the table's Z.
        assert str(where[tag].value) == pseudo.patient_id(patient_id) != str(before)
        return
    if code == "X":
        assert tag not in where, f"{code}: not removed"
        return
    assert tag in where, f"{code}: removed"
    value = where[tag].value
    if code == "K":
        if vr == "SQ":
            _assert_item_cleaned(value)
        else:
            assert value == before, "K: changed"
    elif code in ("Z", "X/Z"):
        # X/Z resolves to Z: conformant for Type 2 and 3, and never Type 1 (PS3.15 E.1.1).
        assert _is_empty(value), f"{code}: not empty: {value!r}"
    elif code in ("D", "X/D", "Z/D", "X/Z/D"):
        # Compound codes with D resolve to D: conformant whatever the attribute's type.
        if vr == "SQ":
            _assert_item_cleaned(value)
            return
        assert not _is_empty(value), "D: PS3.15 asks for a non-zero length value"
        assert value != before, "D: original kept"
        _assert_vr_valid(vr, value)
        if vr == "UI":
            assert value == pseudo.uid(str(before))
    elif code in ("U", "X/Z/U*"):
        if vr == "SQ":
            _assert_item_cleaned(value)
        else:
            assert value == pseudo.uid(str(before)) and value.startswith("2.25.")
            assert len(value) <= 64
    elif code == "C":
        _check_clean(vr, before, value, profile, pseudo)
    else:
        raise AssertionError(f"no expectation for action code {code!r}")


def _check_clean(
    vr: str, before: object, value: object, profile: Profile, pseudo: Pseudonymizer
) -> None:
    if vr == "SQ":
        _assert_item_cleaned(value)
    elif vr in DATE_VRS:
        if profile.shift_dates:
            assert value == _shift(str(before), pseudo.date_offset(PATIENT_ID)), value
        else:
            assert _is_empty(value), f"C: date kept without the modified-dates option: {value!r}"
    elif vr == "TM":
        assert value == (before if profile.shift_dates else ""), value
    elif vr == "UI":
        assert value == pseudo.uid(str(before))
    else:
        assert _is_empty(value), f"C: text not blanked: {value!r}"


CASES = [
    pytest.param(row, option, tag, nested, id=f"{option or 'basic'}-{tag:08X}-{where}")
    for row in ROWS
    for option in PROFILES
    for tag in row.tags()
    for nested, where in ((False, "top"), (True, "nested"))
]


def _unknown(tag: int) -> bool:
    try:
        dictionary_VR(tag)
    except KeyError:
        return True
    return False


# Rows of the 2026d table that the 2024a copy lacked (deid_profiles/source/README.md).
ADDED_SINCE_2024A = {
    "(0008,1301)", "(0008,1302)", "(0008,1303)", "(0008,1304)", "(0010,0011)", "(0010,0012)",
    "(0010,0013)", "(0010,0014)", "(0010,0015)", "(0010,0016)", "(0010,0041)", "(0010,0042)",
    "(0010,0043)", "(0010,0044)", "(0010,0045)", "(0010,0046)", "(0010,0047)", "(0010,2161)",
    "(0010,2162)", "(0012,0022)", "(0012,0023)", "(0012,0032)", "(0012,0041)", "(0012,0043)",
    "(0012,0055)", "(0012,0073)", "(0018,1010)", "(0018,1011)", "(003A,0020)", "(003A,0203)",
    "(003A,020C)", "(0040,0556)", "(0040,A034)", "(0040,A035)", "(0040,B020)", "(0040,B034)",
    "(0040,B036)", "(0040,B03B)", "(0040,B03F)", "(0040,E012)", "(0070,0006)", "(3004,007F)",
    "(300A,0054)",
}  # fmt: skip


def test_table_has_every_row_of_the_2026d_edition() -> None:
    assert len(ROWS) == 656
    assert {r.tag_text for r in ROWS} >= ADDED_SINCE_2024A
    # Only attributes newer than pydicom's dictionary are planted as UN.
    assert {r.tag_text for r in ROWS if any(_unknown(t) for t in r.tags())} <= ADDED_SINCE_2024A


@pytest.mark.parametrize(("row", "option", "tag", "nested"), CASES)
def test_table_action_is_applied(row: Row, option: str | None, tag: int, nested: bool) -> None:
    profile = _profile(option)
    vr = _vr(tag)
    ds = _planted(tag, vr, nested)
    before = _plant_element(tag, vr).value
    # Planting PatientID itself at the top level changes the patient the pseudonyms key on.
    pid = str(before) if tag == 0x00100020 and not nested else PATIENT_ID
    _deidentify(ds, profile)
    check_action(row.code(option), tag, vr, before, _where(ds, tag, nested), profile, pid)


UID_ROWS = [r for r in ROWS if r.codes["basic"] in ("U", "X/Z/U*") and _vr(r.tags()[0]) == "UI"]


@pytest.mark.parametrize("row", UID_ROWS, ids=[r.keyword for r in UID_ROWS])
def test_uid_maps_to_the_same_uid_across_datasets(row: Row) -> None:
    profile = _profile(None)
    tag = row.tags()[0]
    a = _deidentify(_planted(tag, "UI", False, "1.2.826.0.1.3680043.8.498.7001"), profile)
    b = _deidentify(_planted(tag, "UI", True, "1.2.826.0.1.3680043.8.498.7002"), profile)
    first = _where(a, tag, False)[tag].value
    assert first == _where(b, tag, True)[tag].value != PLANTED_UID


SEQ_U_ROWS = [r for r in ROWS if r.codes["basic"] == "X/Z/U*" and _vr(r.tags()[0]) == "SQ"]


@pytest.mark.parametrize("row", SEQ_U_ROWS, ids=[r.keyword for r in SEQ_U_ROWS])
def test_reference_sequence_keeps_items_with_remapped_uids(row: Row) -> None:
    tag = row.tags()[0]
    ds = _minimal()
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref.ReferencedSOPInstanceUID = PLANTED_UID
    ds[tag] = DataElement(tag, "SQ", Sequence([ref]))
    _deidentify(ds, _profile(None))
    [item] = ds[tag].value
    assert item.ReferencedSOPInstanceUID == Pseudonymizer(KEY).uid(PLANTED_UID)
    assert item.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # not in the table: K


# --- private attributes -----------------------------------------------------------------------

PRIVATE_BLOCKS = (
    (0x0029, "SIEMENS CSA HEADER"),
    (0x0009, "GEMS_IDEN_01"),
    (0x0019, "GEMS_ACQU_01"),
    (0x0011, "SOME UNKNOWN CREATOR 1.0"),
)


def _with_private(ds: Dataset) -> Dataset:
    for group, creator in PRIVATE_BLOCKS:
        block = ds.private_block(group, creator, create=True)
        block.add_new(0x10, "LO", PLANTED_NAME)
        block.add_new(0x20, "OB", b"PLANTED!")
    return ds


@pytest.mark.parametrize("option", PROFILES, ids=[o or "basic" for o in PROFILES])
def test_private_attributes_are_removed_at_every_level(option: str | None) -> None:
    # PS3.15 E.1-1 "Private attributes": X. Retain Safe Private (E.3.10) keeps only attributes
    # known safe (Table E.3.10-1, tests/test_deid_safe_private.py); none of these is.
    ds = _with_private(_minimal())
    item = _with_private(Dataset())
    item.CodeValue = "39607008"
    ds[CARRIER] = DataElement(CARRIER, "SQ", Sequence([item]))
    _deidentify(ds, _profile(option))
    assert not [e.tag for e in ds if e.tag.is_private]
    assert not [e.tag for e in ds[CARRIER].value[0] if e.tag.is_private]


# --- dates, UIDs and malformed values ---------------------------------------------------------

MODIFIED = ("retain_long_modified_dates",)


def test_dates_in_sequences_shift_by_the_top_level_offset() -> None:
    ds = _minimal()
    ds.StudyDate = "20240117"
    item = Dataset()
    item.CodeValue = "39607008"
    item.ContentDate = "20240120"
    item.AcquisitionDateTime = "20240121080000"
    inner = Dataset()
    inner.SeriesDate = "20240122"
    item.ReferencedImageSequence = Sequence([inner])
    ds.AnatomicRegionSequence = Sequence([item])
    _deidentify(ds, load_profile("basic", MODIFIED))
    days = Pseudonymizer(KEY).date_offset(PATIENT_ID)
    assert ds.StudyDate == _shift("20240117", days)
    region = ds.AnatomicRegionSequence[0]
    assert region.ContentDate == _shift("20240120", days)
    assert region.AcquisitionDateTime == _shift("20240121080000", days)
    assert region.ReferencedImageSequence[0].SeriesDate == _shift("20240122", days)


@pytest.mark.parametrize(
    "value",
    ["20240117101500.123456+0100", "20240117101500-0500", "20240301000000+1400", "20240101+0000"],
)
def test_datetime_with_timezone_suffix_shifts_the_date_and_keeps_the_rest(value: str) -> None:
    ds = _minimal()
    ds.AcquisitionDateTime = value
    _deidentify(ds, load_profile("basic", MODIFIED))
    days = Pseudonymizer(KEY).date_offset(PATIENT_ID)
    assert ds.AcquisitionDateTime == _shift(value, days)
    validate_value("DT", ds.AcquisitionDateTime, config.RAISE)


def test_multivalued_uid_is_remapped_value_by_value() -> None:
    pseudo = Pseudonymizer(KEY)
    uids = ["1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", PLANTED_UID]
    ds = _minimal()
    ds.RelatedFrameOfReferenceUID = uids  # (0020,3404) U
    _deidentify(ds, _profile(None))
    assert list(ds.RelatedFrameOfReferenceUID) == [pseudo.uid(u) for u in uids]


def _deidentified_or_refused(ds: Dataset, options: tuple[str, ...]) -> Dataset | None:
    try:
        return _deidentify(ds, load_profile("basic", options))
    except (ProfileError, InstanceRefused):
        return None


@pytest.mark.parametrize("options", [(), MODIFIED], ids=["basic", "modified_dates"])
def test_malformed_values_are_never_kept(options: tuple[str, ...]) -> None:
    long_uid = "1.2.826.0.1.3680043.8.498." + "9" * 44  # 70 characters
    bad = {
        "StudyInstanceUID": long_uid,
        "StudyDate": "2024-01-01",
        "SeriesDate": "2024011",
        "AcquisitionDateTime": "2024-01-01T10:00",
        "ContentDate": "20241399",
        "PatientBirthDate": "1958-03-14",
        "AccessionNumber": "A" * 40,
        "InstanceCreationTime": "25:99:99",
    }
    ds = _minimal()
    for keyword, value in bad.items():
        elem = DataElement(keyword, dictionary_VR(keyword), value, validation_mode=config.IGNORE)
        ds[elem.tag] = elem
    out = _deidentified_or_refused(ds, options)
    if out is None:
        return
    for keyword, value in bad.items():
        assert str(out.get(keyword, "")) != value, f"{keyword} kept its original value"
    if options:
        assert out.StudyDate == "" and out.ContentDate == ""  # cannot be shifted: emptied


def test_known_attributes_sent_as_un_are_deidentified_as_their_dictionary_vr() -> None:
    # A sender's explicit-VR file may label known attributes UN; intake reads them as their
    # dictionary VR, so the UID is remapped (references hold) and the date shifted.
    ds = _minimal()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds[0x0020000E] = DataElement(0x0020000E, "UN", PLANTED_UID.encode())
    ds[0x00080020] = DataElement(0x00080020, "UN", b"20240117")
    parsed, _ = intake._read(to_bytes(ds))
    _deidentify(parsed, load_profile("basic", MODIFIED))
    assert parsed.SeriesInstanceUID == Pseudonymizer(KEY).uid(PLANTED_UID)
    assert parsed.StudyDate == _shift("20240117", Pseudonymizer(KEY).date_offset(PATIENT_ID))


def test_method_is_a_valid_lo_with_every_option() -> None:
    ds = _deidentify(_minimal(), load_profile("basic", OPTIONS))
    validate_value("LO", ds.DeidentificationMethod, config.RAISE)  # PS3.5 6.2: <= 64 chars
    assert len(ds.DeidentificationMethodCodeSequence) == 1 + len(OPTIONS)
