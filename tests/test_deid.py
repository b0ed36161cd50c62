"""The de-identification engine on datasets: PS3.15 actions from the generated recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset, Sequence

from carina.curation.deid import (
    Deidentifier,
    Profile,
    compile_recipes,
    load_profile,
    recipe_paths,
)
from carina.curation.errors import ProfileError
from carina.curation.pseudonyms import Pseudonymizer, collection_key
from tests.factory import Phi, ct_instance

OPTIONS = ("retain_long_modified_dates",)


def deidentify(ds: Dataset, key: bytes = b"k" * 32, options: tuple[str, ...] = OPTIONS) -> Dataset:
    Deidentifier(load_profile("basic", options), Pseudonymizer(key)).apply(ds)
    return ds


def test_basic_profile_compiles_every_table_row() -> None:
    profile = load_profile("basic", ())
    # 656 rows in Table E.1-1 (2026d): 653 exact tags and 3 masks, plus Carina's two lines.
    assert len(profile.exact) + len(profile.masks) >= 600
    assert profile.rule_for(0x00100010) is not None


def test_identifying_attributes_are_removed_or_replaced() -> None:
    phi = Phi()
    ds = deidentify(ct_instance(phi, 1))
    assert "OtherPatientIDs" not in ds
    assert "PatientAddress" not in ds
    assert "ImageComments" not in ds
    # X/Z/D resolves to D: a dummy, never the original (see curation/deid.py).
    assert ds.InstitutionName not in ("", phi.institution)
    assert ds.AccessionNumber == ""
    assert ds.ReferringPhysicianName == ""
    assert ds.PatientBirthDate == ""
    assert ds.PatientID != phi.patient_id and ds.PatientName == ds.PatientID
    assert "SourceApplicationEntityTitle" not in ds.file_meta


def test_attributes_inside_kept_sequences_are_cleaned() -> None:
    phi = Phi()
    ds = ct_instance(phi, 1)
    region = Dataset()
    region.CodeValue = "39607008"
    region.PatientName = phi.patient_name  # (0008,2218) is not in the table: kept, recursed
    ds.AnatomicRegionSequence = Sequence([region])
    deidentify(ds)
    assert ds.AnatomicRegionSequence[0].CodeValue == "39607008"
    assert ds.AnatomicRegionSequence[0].PatientName != phi.patient_name


def test_reference_sequences_keep_their_items_with_remapped_uids() -> None:
    phi = Phi()
    source = ct_instance(phi, 1)
    ds = ct_instance(phi, 2)
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ds.ReferencedImageSequence = Sequence([ref])  # X/Z/U* in the Basic Profile
    deidentify(source)
    deidentify(ds)
    [item] = ds.ReferencedImageSequence
    assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID  # resolves after remapping
    assert item.ReferencedSOPClassUID == source.SOPClassUID


def test_private_attributes_are_removed() -> None:
    ds = deidentify(ct_instance(Phi(), 1))
    assert not any(elem.tag.is_private for elem in ds)


def test_masked_groups_are_matched() -> None:
    ds = ct_instance(Phi(), 1)
    ds.add_new(0x60003000, "OW", b"\x00\x01" * 8)  # Overlay Data, (60xx,3000) in the table
    ds.add_new(0x50000010, "US", 3)  # curve data, (50xx,xxxx)
    deidentify(ds)
    assert 0x60003000 not in ds
    assert 0x50000010 not in ds


def test_uids_map_consistently_and_differ_between_collections() -> None:
    phi = Phi()
    a1 = deidentify(ct_instance(phi, 1), collection_key(b"master", "A"))
    a2 = deidentify(ct_instance(phi, 2), collection_key(b"master", "A"))
    b1 = deidentify(ct_instance(phi, 1), collection_key(b"master", "B"))
    assert a1.StudyInstanceUID == a2.StudyInstanceUID != b1.StudyInstanceUID
    assert a1.FrameOfReferenceUID == a2.FrameOfReferenceUID
    assert a1.StudyInstanceUID.startswith("2.25.")
    assert len(a1.StudyInstanceUID) <= 64
    assert a1.PatientID == a2.PatientID != b1.PatientID


def test_dates_shift_by_one_offset_per_patient() -> None:
    ds = ct_instance(Phi(study_date="20240117"), 1)
    ds.AcquisitionDate = "20240120"
    deidentify(ds)
    assert ds.StudyDate != "20240117"
    import datetime as dt

    def d(v: str) -> dt.date:
        return dt.date(int(v[:4]), int(v[4:6]), int(v[6:]))

    assert (d(ds.AcquisitionDate) - d(ds.StudyDate)).days == 3
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"


def test_without_date_option_dates_are_emptied() -> None:
    ds = deidentify(ct_instance(Phi(), 1), options=())
    assert ds.StudyDate == ""
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"


def test_method_is_recorded_with_cid_7050_codes() -> None:
    ds = deidentify(ct_instance(Phi(), 1))
    assert ds.PatientIdentityRemoved == "YES"
    codes = [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107"]


def test_zero_on_a_sequence_empties_it() -> None:
    ds = Dataset()
    item = Dataset()
    item.PatientID = "X"
    ds.OtherPatientIDsSequence = Sequence([item])  # basic profile: X (removed)
    ds.ReferencedPatientSequence = Sequence([item])  # basic profile: X
    ds.PatientID = "ID"
    ds.StudyInstanceUID = "1.2.3"
    deidentify(ds)
    assert "OtherPatientIDsSequence" not in ds


def test_pixel_data_is_untouched() -> None:
    ds = ct_instance(Phi(), 1)
    before = ds.PixelData
    deidentify(ds)
    assert ds.PixelData is before


def test_unknown_option_is_refused() -> None:
    with pytest.raises(ProfileError, match="unknown"):
        recipe_paths("basic", ["retain_everything"])


def test_recipe_with_unknown_keyword_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.dicom"
    recipe.write_text("FORMAT dicom\n\n%header\n\nREMOVE NotAKeyword\n")
    with pytest.raises(ProfileError, match="NotAKeyword"):
        compile_recipes("bad", (), [recipe])


def test_recipe_with_unknown_function_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.dicom"
    recipe.write_text("FORMAT dicom\n\n%header\n\nREPLACE PatientID func:nope\n")
    with pytest.raises(ProfileError, match="func:nope"):
        compile_recipes("bad", (), [recipe])


def test_profile_is_a_frozen_value() -> None:
    profile = load_profile("basic", OPTIONS)
    assert isinstance(profile, Profile)
    with pytest.raises(AttributeError):
        profile.name = "x"  # type: ignore[misc]
