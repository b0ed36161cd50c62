"""Series rules on generated data: each planted problem gives its finding, clean series none."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence

import pytest
from pydicom import Dataset
from pydicom import Sequence as DicomSequence
from pydicom.uid import SecondaryCaptureImageStorage, UltrasoundImageStorage, generate_uid

from carina.curation.deid import Deidentifier, load_profile
from carina.curation.geometry import json_key, series_geometry
from carina.curation.pseudonyms import Pseudonymizer
from carina.curation.rules import (
    BurnedInSettings,
    Finding,
    GeometrySettings,
    InstanceFacts,
    Manifest,
    ManifestError,
    ManifestRow,
    PatientIdentifiers,
    PrivateSettings,
    RulesConfig,
    SeriesFacts,
    TextDetection,
    TextRegion,
    check_manifest,
    parse_manifest,
    patient_identifiers,
    quarantined,
    run_rules,
    series_facts,
    type1_table,
)
from tests.factory import Phi, ct_series, to_bytes

DEID = Deidentifier(
    load_profile("basic", ("retain_long_modified_dates",)), Pseudonymizer(b"k" * 32)
)


def deidentified(originals: Sequence[Dataset]) -> list[Dataset]:
    """Copies of originals de-identified by the Basic Profile, as intake stores them."""
    out = []
    for original in originals:
        ds = copy.deepcopy(original)
        DEID.apply(ds)
        out.append(ds)
    return out


def facts_of(datasets: Sequence[Dataset], shas: Sequence[str] | None = None) -> SeriesFacts:
    """Series facts from datasets, with metadata as intake writes it and real sha256s."""
    shas = shas or [hashlib.sha256(to_bytes(ds)).hexdigest() for ds in datasets]
    return series_facts(
        "lung-pilot",
        [
            InstanceFacts(ds.SOPInstanceUID, sha, ds.to_json_dict())
            for ds, sha in zip(datasets, shas, strict=True)
        ],
    )


def codes(findings: Sequence[Finding]) -> list[str]:
    """The codes of findings, in order."""
    return [f.code for f in findings]


def assert_no_phi(findings: Sequence[Finding], phi: Phi, *extra: str) -> None:
    """No finding's sentence or attribute repeats any planted identifying string."""
    for finding in findings:
        said = f"{finding.message} {finding.attribute or ''}".lower()
        for planted in [*phi.strings(), *extra]:
            assert planted.lower() not in said, (finding.code, planted)


@pytest.fixture
def phi() -> Phi:
    return Phi()


@pytest.fixture
def originals(phi: Phi) -> list[Dataset]:
    return ct_series(phi, 5)


@pytest.fixture
def identifiers(originals: list[Dataset]) -> PatientIdentifiers:
    return patient_identifiers(originals[0])


@pytest.fixture
def series(originals: list[Dataset]) -> list[Dataset]:
    return deidentified(originals)


# ---------------------------------------------------------------------------------------------
# Clean data


def test_clean_deidentified_ct_series_has_no_findings(
    series: list[Dataset], identifiers: PatientIdentifiers
) -> None:
    findings = run_rules(facts_of(series), RulesConfig(), identifiers)
    assert findings == []
    assert not quarantined(findings)


def test_clean_series_geometry_figures_are_right_and_json_ready(series: list[Dataset]) -> None:
    g = facts_of(series).geometry
    assert (g.has_geometry, g.slice_count, g.localizers, g.missing_slices) == (True, 5, 0, 0)
    assert g.spacing_min == g.spacing_max == g.spacing_mean == pytest.approx(1.0)
    assert (g.thickness_min, g.thickness_max, g.tilt_degrees) == (1.0, 1.0, 0.0)
    assert json.loads(json.dumps(g.as_dict()))["slice_count"] == 5


def test_patient_identifiers_never_show_in_repr(identifiers: PatientIdentifiers, phi: Phi) -> None:
    assert phi.patient_id not in repr(identifiers)
    assert identifiers.ids == (phi.patient_id, phi.other_id)
    assert identifiers.birth_dates == (phi.birth_date,)


# ---------------------------------------------------------------------------------------------
# (a) Burned-in text


def test_burned_in_annotation_yes_holds_series(
    series: list[Dataset], identifiers: PatientIdentifiers, phi: Phi
) -> None:
    series[2].BurnedInAnnotation = "YES"
    findings = run_rules(facts_of(series), RulesConfig(), identifiers)
    assert codes(findings) == ["burned-in-annotation"]
    assert findings[0].instances == (series[2].SOPInstanceUID,)
    assert quarantined(findings)
    assert_no_phi(findings, phi)


def _as_ultrasound(series: list[Dataset]) -> list[Dataset]:
    for ds in series:
        ds.Modality = "US"
        ds.SOPClassUID = UltrasoundImageStorage
    return series


def test_ultrasound_series_is_held_saying_ocr_was_not_run(series: list[Dataset]) -> None:
    findings = run_rules(facts_of(_as_ultrasound(series)), RulesConfig(), PatientIdentifiers())
    assert codes(findings) == ["burned-in-risk"]
    assert "modality US" in findings[0].message
    assert "OCR was not run (no detector configured)" in findings[0].message


def test_secondary_capture_class_is_held_as_burned_in_risk(series: list[Dataset]) -> None:
    for ds in series:
        ds.SOPClassUID = SecondaryCaptureImageStorage
    findings = run_rules(facts_of(series), RulesConfig(), PatientIdentifiers())
    assert "burned-in-risk" in codes(findings)
    assert "Secondary Capture" in findings[0].message


def test_cr_is_burned_in_risk_only_when_collection_says_so(series: list[Dataset]) -> None:
    for ds in series:
        ds.Modality = "CR"
    facts = facts_of(series)
    off = RulesConfig(burned_in=BurnedInSettings())
    on = RulesConfig(burned_in=BurnedInSettings(include_cr_dx=True))
    assert "burned-in-risk" not in codes(run_rules(facts, off, PatientIdentifiers()))
    assert "burned-in-risk" in codes(run_rules(facts, on, PatientIdentifiers()))


def test_detector_that_found_no_text_clears_ultrasound(series: list[Dataset]) -> None:
    config = RulesConfig(burned_in=BurnedInSettings(detector=lambda f: TextDetection(ran=True)))
    findings = run_rules(facts_of(_as_ultrasound(series)), config, PatientIdentifiers())
    assert findings == []


def test_detector_that_found_text_holds_as_burned_in_ocr(series: list[Dataset]) -> None:
    hit = series[1].SOPInstanceUID
    config = RulesConfig(burned_in=BurnedInSettings(detector=lambda f: TextDetection(True, (hit,))))
    findings = run_rules(facts_of(_as_ultrasound(series)), config, PatientIdentifiers())
    assert codes(findings) == ["burned-in-ocr"]
    assert findings[0].instances == (hit,)


def test_ct_is_read_by_the_detector_too(series: list[Dataset]) -> None:
    hit = series[0].SOPInstanceUID
    region = TextRegion(hit, 1, 4, 4, 60, 12, 2)
    found = TextDetection(True, (hit,), regions=(region,), frames=3)
    config = RulesConfig(burned_in=BurnedInSettings(detector=lambda f: found))
    [finding] = run_rules(facts_of(series), config, PatientIdentifiers())
    assert (finding.code, finding.severity, finding.regions) == ("burned-in-ocr", "hold", (region,))
    assert "2 word(s) in 1 line(s)" in finding.message


def test_ocr_that_could_not_run_on_ct_says_so_with_the_collections_severity(
    series: list[Dataset],
) -> None:
    missing = TextDetection(False, reason="tesseract not found (tesseract)")
    warned = BurnedInSettings(detector=lambda f: missing)
    [finding] = run_rules(facts_of(series), RulesConfig(burned_in=warned), PatientIdentifiers())
    assert finding.code == "burned-in-ocr-unavailable" and finding.severity == "warn"
    assert "tesseract not found" in finding.message
    held = RulesConfig(
        burned_in=BurnedInSettings(detector=lambda f: missing, ocr_unavailable="hold")
    )
    assert quarantined(run_rules(facts_of(series), held, PatientIdentifiers()))
    off = RulesConfig(burned_in=BurnedInSettings(detector=lambda f: missing, ocr=False))
    assert run_rules(facts_of(series), off, PatientIdentifiers()) == []


def test_detector_that_failed_is_reported_as_ocr_not_run(series: list[Dataset]) -> None:
    def broken(facts: SeriesFacts) -> TextDetection:
        raise OSError("tesseract missing")

    config = RulesConfig(burned_in=BurnedInSettings(detector=broken))
    findings = run_rules(facts_of(_as_ultrasound(series)), config, PatientIdentifiers())
    assert codes(findings) == ["burned-in-risk"]
    assert "detector failed: OSError" in findings[0].message


def test_burned_in_rule_switched_off_gives_nothing(series: list[Dataset]) -> None:
    series[0].BurnedInAnnotation = "YES"
    config = RulesConfig(burned_in=BurnedInSettings(enabled=False))
    assert run_rules(facts_of(series), config, PatientIdentifiers()) == []


# ---------------------------------------------------------------------------------------------
# (b) Residual PHI


def test_name_left_in_image_comments_is_residual_phi_without_repeating_it(
    series: list[Dataset], identifiers: PatientIdentifiers, phi: Phi
) -> None:
    series[0].ImageComments = "reviewed: johanna Smitherson, stable"  # case changed
    findings = run_rules(facts_of(series), RulesConfig(), identifiers)
    assert [(f.code, f.attribute) for f in findings] == [("residual-phi", "ImageComments")]
    assert "a part of the patient's name" in findings[0].message
    assert findings[0].instances == (series[0].SOPInstanceUID,)
    assert_no_phi(findings, phi, "johanna", "smitherson")


def test_name_part_inside_a_sequence_is_residual_phi_named_by_path(
    series: list[Dataset], identifiers: PatientIdentifiers, phi: Phi
) -> None:
    item = Dataset()
    item.RequestedProcedureDescription = "CT for SMITHERSON"
    series[3].RequestAttributesSequence = DicomSequence([item])
    findings = run_rules(facts_of(series), RulesConfig(), identifiers)
    assert [f.attribute for f in findings] == [
        "RequestAttributesSequence.RequestedProcedureDescription"
    ]
    assert_no_phi(findings, phi)


def test_patient_id_and_birth_date_in_free_text_are_residual_phi(
    series: list[Dataset], identifiers: PatientIdentifiers, phi: Phi
) -> None:
    series[0].ImageComments = "mrn 7734921"  # the ID with its separator changed
    series[1].StudyDescription = "born 14 March 1958"
    series[2].SeriesDescription = "dob 03/14/1958"
    findings = [f for f in run_rules(facts_of(series), RulesConfig(), identifiers)]
    kinds = {
        (f.code, f.attribute, f.message.split(" still holds ")[-1].split(" after")[0])
        for f in findings
        if f.code == "residual-phi"
    }
    assert kinds == {
        ("residual-phi", "ImageComments", "a patient ID"),
        ("residual-phi", "StudyDescription", "the patient's birth date"),
        ("residual-phi", "SeriesDescription", "the patient's birth date"),
    }
    assert quarantined(findings)
    assert_no_phi(findings, phi, "7734921", "14 March 1958", "03/14/1958")


def test_short_name_parts_and_words_containing_a_part_are_not_flagged(
    series: list[Dataset],
) -> None:
    identifiers = PatientIdentifiers(names=("ANN^LI^Q",))
    series[0].ImageComments = "ANNOTATION by LIVER protocol Q"
    assert run_rules(facts_of(series), RulesConfig(), identifiers) == []


def test_date_like_free_text_is_held_as_residual_phi_pattern(
    series: list[Dataset], identifiers: PatientIdentifiers
) -> None:
    series[4].ImageComments = "repeat scan 2023-11-02 after contrast"
    findings = run_rules(facts_of(series), RulesConfig(), identifiers)
    assert [(f.code, f.attribute, f.severity) for f in findings] == [
        ("residual-phi-pattern", "ImageComments", "hold")
    ]
    assert "2023" not in findings[0].message


def test_version_numbers_and_technical_text_are_not_date_like(
    series: list[Dataset], identifiers: PatientIdentifiers
) -> None:
    for ds in series:
        ds.SoftwareVersions = ["3.1.20", "VA48A"]
        ds.ProtocolName = "Chest 1.25 mm 120 kV 5/2"
        ds.ConvolutionKernel = "B30f"
    assert run_rules(facts_of(series), RulesConfig(), identifiers) == []


def test_name_like_free_text_is_held_as_residual_phi_pattern(
    series: list[Dataset], identifiers: PatientIdentifiers
) -> None:
    series[4].SeriesDescription = "per Dr. Whitlock"
    findings = run_rules(facts_of(series), RulesConfig(), identifiers)
    assert codes(findings) == ["residual-phi-pattern"]
    assert "Whitlock" not in findings[0].message


def test_missing_identifiers_are_reported_as_residual_phi_unchecked(
    series: list[Dataset],
) -> None:
    findings = run_rules(facts_of(series), RulesConfig(), None)
    assert [(f.code, f.severity) for f in findings] == [("residual-phi-unchecked", "warn")]
    assert not quarantined(findings)


# ---------------------------------------------------------------------------------------------
# (c) Private attributes


def test_unknown_private_attribute_is_held_and_safe_one_is_not(
    series: list[Dataset], identifiers: PatientIdentifiers, phi: Phi
) -> None:
    for ds in series:
        ds.private_block(0x0019, "ACME SCAN", create=True).add_new(0x12, "DS", "2.5")
    block = series[0].private_block(0x0029, "ACME PRIVATE", create=True)
    block.add_new(0x10, "LO", phi.patient_name)
    safe = PrivateSettings(safe=frozenset({(0x0019, "ACME SCAN", 0x12)}))
    findings = run_rules(facts_of(series), RulesConfig(private=safe), identifiers)
    private = [f for f in findings if f.code == "private-attribute"]
    assert [(f.attribute, f.instances) for f in private] == [
        ('(0029,xx10) of "ACME PRIVATE"', (series[0].SOPInstanceUID,))
    ]
    assert_no_phi(findings, phi)
    everything = run_rules(facts_of(series), RulesConfig(), identifiers)
    assert sum(f.code == "private-attribute" for f in everything) == 2


# ---------------------------------------------------------------------------------------------
# (d) Geometry


def _z(series: list[Dataset], zs: Sequence[float]) -> list[Dataset]:
    for ds, z in zip(series, zs, strict=True):
        ds.ImagePositionPatient = [0.0, 0.0, z]
    return series


def test_missing_slice_is_held_as_non_uniform_spacing(
    series: list[Dataset], identifiers: PatientIdentifiers
) -> None:
    facts = facts_of(_z(series[:4], [1.0, 2.0, 4.0, 5.0]))
    findings = run_rules(facts, RulesConfig(), identifiers)
    assert codes(findings) == ["geometry-missing-slices"]
    assert facts.geometry.missing_slices == 1
    assert (facts.geometry.spacing_min, facts.geometry.spacing_max) == (1.0, 2.0)


def test_slices_out_of_order_are_sorted_along_the_normal_before_spacing(
    series: list[Dataset],
) -> None:
    facts = facts_of(_z(series, [3.0, 1.0, 5.0, 2.0, 4.0]))
    assert facts.geometry.spacing_uniform and facts.geometry.missing_slices == 0


def test_slice_rotated_out_of_plane_is_held_as_inconsistent_orientation(
    series: list[Dataset], identifiers: PatientIdentifiers
) -> None:
    # 5 degrees about the x axis: still axial enough not to be a localizer.
    series[2].ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.996195, 0.087156]
    findings = run_rules(facts_of(series), RulesConfig(), identifiers)
    assert "geometry-orientation" in codes(findings)


def test_gantry_tilted_series_is_held_as_tilt(
    series: list[Dataset], identifiers: PatientIdentifiers
) -> None:
    for ds in series:  # 15 degrees: y moves 0.268 mm per 1 mm of z
        z = float(ds.ImagePositionPatient[2])
        ds.ImagePositionPatient = [0.0, round(0.267949 * z, 6), z]
    facts = facts_of(series)
    findings = run_rules(facts, RulesConfig(), identifiers)
    assert codes(findings) == ["geometry-tilt"]
    assert facts.geometry.tilt_degrees == pytest.approx(15.0, abs=0.01)


def test_one_displaced_slice_is_held_as_tilt(
    series: list[Dataset], identifiers: PatientIdentifiers
) -> None:
    series[2].ImagePositionPatient = [3.0, 0.0, 3.0]
    assert codes(run_rules(facts_of(series), RulesConfig(), identifiers)) == ["geometry-tilt"]


def test_localizer_image_type_is_held_as_localizer_only(
    series: list[Dataset], identifiers: PatientIdentifiers
) -> None:
    series[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    series[0].ImagePositionPatient = [0.0, 0.0, 0.0]  # would also break the spacing if counted
    facts = facts_of(series)
    assert codes(run_rules(facts, RulesConfig(), identifiers)) == ["geometry-localizer"]
    assert (facts.geometry.localizers, facts.geometry.slice_count) == (1, 4)


def test_single_orthogonal_slice_is_detected_as_localizer(
    series: list[Dataset], identifiers: PatientIdentifiers
) -> None:
    series[4].ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # sagittal
    series[4].ImagePositionPatient = [-40.0, -100.0, 100.0]
    findings = run_rules(facts_of(series), RulesConfig(), identifiers)
    assert codes(findings) == ["geometry-localizer"]


def test_localizer_may_be_configured_as_warning(series: list[Dataset]) -> None:
    series[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    config = RulesConfig(geometry=GeometrySettings(hold_localizers=False))
    findings = run_rules(facts_of(series), config, PatientIdentifiers())
    assert [(f.code, f.severity) for f in findings] == [("geometry-localizer", "warn")]


def test_duplicate_position_is_held(series: list[Dataset], identifiers: PatientIdentifiers) -> None:
    facts = facts_of(_z(series, [1.0, 2.0, 2.0, 3.0, 4.0]))
    assert codes(run_rules(facts, RulesConfig(), identifiers)) == ["geometry-duplicate-position"]
    assert facts.geometry.duplicate_positions == 1


def test_differing_pixel_spacing_is_held(
    series: list[Dataset], identifiers: PatientIdentifiers
) -> None:
    series[1].PixelSpacing = [0.8, 0.8]
    findings = run_rules(facts_of(series), RulesConfig(), identifiers)
    assert codes(findings) == ["geometry-pixel-spacing"]


@pytest.mark.parametrize(
    ("limits", "held"),
    [
        ({"min_slices": 6}, True),
        ({"max_slices": 4}, True),
        ({"min_slices": 5, "max_slices": 5}, False),
    ],
)
def test_slice_count_outside_collection_limits_is_held(
    series: list[Dataset], identifiers: PatientIdentifiers, limits: dict, held: bool
) -> None:
    config = RulesConfig(geometry=GeometrySettings(**limits))
    found = codes(run_rules(facts_of(series), config, identifiers))
    assert found == (["geometry-slice-count"] if held else [])


@pytest.mark.parametrize(
    ("limits", "held"),
    [
        ({"max_thickness": 0.8}, True),
        ({"min_thickness": 1.5}, True),
        ({"min_thickness": 0.5, "max_thickness": 1.0}, False),
    ],
)
def test_slice_thickness_outside_collection_limits_is_held(
    series: list[Dataset], identifiers: PatientIdentifiers, limits: dict, held: bool
) -> None:
    config = RulesConfig(geometry=GeometrySettings(**limits))
    found = codes(run_rules(facts_of(series), config, identifiers))
    assert found == (["geometry-slice-thickness"] if held else [])


def test_thickness_limit_holds_series_without_slice_thickness(series: list[Dataset]) -> None:
    for ds in series:
        del ds.SliceThickness
    config = RulesConfig(geometry=GeometrySettings(max_thickness=5.0))
    assert codes(run_rules(facts_of(series), config, PatientIdentifiers())) == [
        "geometry-slice-thickness"
    ]


def test_single_slice_series_has_geometry_but_no_spacing(series: list[Dataset]) -> None:
    facts = facts_of(series[:1])
    assert facts.geometry.slice_count == 1 and facts.geometry.spacing_mean is None
    assert run_rules(facts, RulesConfig(), PatientIdentifiers()) == []


def _enhanced(zs: Sequence[float], thickness: float = 1.0) -> dict:
    """Enhanced multi-frame metadata: orientation and spacing shared, positions per frame."""

    def seq(*items: dict) -> dict:
        return {"vr": "SQ", "Value": list(items)}

    def ds(vr: str, *v: float) -> dict:
        return {"vr": vr, "Value": list(v)}

    shared = {
        json_key("PlaneOrientationSequence"): seq(
            {json_key("ImageOrientationPatient"): ds("DS", 1, 0, 0, 0, 1, 0)}
        ),
        json_key("PixelMeasuresSequence"): seq(
            {
                json_key("PixelSpacing"): ds("DS", 0.5, 0.5),
                json_key("SliceThickness"): ds("DS", thickness),
            }
        ),
    }
    frames = [
        {
            json_key("PlanePositionSequence"): seq(
                {json_key("ImagePositionPatient"): ds("DS", 0, 0, z)}
            )
        }
        for z in zs
    ]
    return {
        json_key("NumberOfFrames"): ds("IS", len(zs)),
        json_key("SharedFunctionalGroupsSequence"): seq(shared),
        json_key("PerFrameFunctionalGroupsSequence"): seq(*frames),
    }


def test_enhanced_multiframe_geometry_reads_functional_groups() -> None:
    clean = series_geometry([_enhanced([0.0, 2.0, 4.0, 6.0])])
    assert (clean.multiframe, clean.slice_count, clean.spacing_mean) == (True, 4, 2.0)
    assert clean.spacing_uniform
    gap = series_geometry([_enhanced([0.0, 2.0, 6.0, 8.0])])
    assert (gap.spacing_uniform, gap.missing_slices) == (False, 1)


def test_multiframe_without_positions_has_no_geometry_and_says_why() -> None:
    cine = {json_key("NumberOfFrames"): {"vr": "IS", "Value": [30]}}
    g = series_geometry([cine])
    assert not g.has_geometry
    assert g.notes[0] == "instance 1 has 30 frames without per-frame positions"


# ---------------------------------------------------------------------------------------------
# (e) Mixed patients and studies, duplicate instances


def test_two_patients_in_one_series_are_held(identifiers: PatientIdentifiers, phi: Phi) -> None:
    other = Phi(patient_id="MRN-1100223", series_uid=phi.series_uid, study_uid=phi.study_uid)
    # The second patient's slices continue at z = 4, 5 so the geometry stays clean.
    series = deidentified(ct_series(phi, 3) + ct_series(other, 5)[3:])
    findings = run_rules(facts_of(series), RulesConfig(), identifiers)
    assert [(f.code, f.attribute) for f in findings] == [("mixed-patients", "PatientID")]
    assert_no_phi(findings, phi, "MRN-1100223")


def test_two_studies_in_one_series_are_held(identifiers: PatientIdentifiers, phi: Phi) -> None:
    other = Phi(series_uid=phi.series_uid)  # a new StudyInstanceUID
    originals = ct_series(phi, 3) + ct_series(other, 5)[3:]  # z continues: geometry is clean
    findings = run_rules(facts_of(deidentified(originals)), RulesConfig(), identifiers)
    assert codes(findings) == ["mixed-studies"]
    assert_no_phi(findings, phi)


def test_duplicate_sop_uid_with_different_content_is_held(
    series: list[Dataset], identifiers: PatientIdentifiers
) -> None:
    twin = copy.deepcopy(series[4])
    twin.PixelData = bytes(len(twin.PixelData))
    datasets = [*series, twin]
    facts = facts_of(datasets)
    findings = run_rules(facts, RulesConfig(), identifiers)
    dup = [f for f in findings if f.code == "duplicate-sop-instance"]
    assert [f.instances for f in dup] == [(series[4].SOPInstanceUID,)]


def test_duplicate_sop_uid_with_same_content_is_not_a_clash(
    series: list[Dataset], identifiers: PatientIdentifiers
) -> None:
    facts = facts_of([*series, series[0]])
    assert "duplicate-sop-instance" not in codes(run_rules(facts, RulesConfig(), identifiers))


# ---------------------------------------------------------------------------------------------
# (f) Manifest


def _series_of(phi: Phi, count: int) -> SeriesFacts:
    return facts_of(
        deidentified(ct_series(Phi(patient_id=phi.patient_id, study_uid=phi.study_uid), count))
    )


def test_manifest_expecting_three_series_when_two_came_holds_submission(phi: Phi) -> None:
    manifest = parse_manifest("modality,patients,studies,series,instances\nCT,1,1,3,6\n")
    findings = check_manifest(manifest, [_series_of(phi, 3), _series_of(phi, 3)])
    assert [(f.code, f.message) for f in findings] == [
        ("manifest-count", "The manifest expects 3 CT series, 2 arrived.")
    ]


def test_manifest_matching_what_came_gives_no_findings(phi: Phi) -> None:
    manifest = Manifest((ManifestRow("CT", 1, 1, 2, 5),))
    assert check_manifest(manifest, [_series_of(phi, 3), _series_of(phi, 2)]) == []


def test_modality_missing_from_manifest_is_held(phi: Phi) -> None:
    us = facts_of(_as_ultrasound(deidentified(ct_series(phi, 1))))
    manifest = parse_manifest("modality,patients,studies,series,instances\nCT,1,1,1,2\n")
    findings = check_manifest(manifest, [_series_of(phi, 2), us])
    assert codes(findings) == ["manifest-unexpected-modality"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "the manifest is empty"),
        (
            "modality,patients,studies,series\nCT,1,1,1\n",
            "line 1: the header lacks column(s) instances",
        ),
        ("modality,patients,studies,series,instances\nCT,1,1,x,4\n", "line 2: series must be"),
        ("modality,patients,studies,series,instances\nCT,1,1,1\n", "line 2: 4 fields, expected 5"),
        ("modality,patients,studies,series,instances\nCT,1,1,1,-2\n", "line 2: instances must"),
        (
            "modality,patients,studies,series,instances\nCT,1,1,1,2\n\nct,1,1,1,2\n",
            "line 4: modality CT is listed twice",
        ),
        ("modality,patients,studies,series,instances\nC;T,1,1,1,2\n", "is not a DICOM CS"),
    ],
)
def test_bad_manifest_rows_raise_a_clear_error(text: str, error: str) -> None:
    with pytest.raises(ManifestError, match=error.replace("(", r"\(").replace(")", r"\)")):
        parse_manifest(text)


def test_manifest_accepts_header_case_column_order_and_bom() -> None:
    manifest = parse_manifest("\ufeffInstances,Modality,Series,Studies,Patients\n10,mr,2,1,1\n")
    assert manifest.rows == (ManifestRow("MR", 1, 1, 2, 10),)


# ---------------------------------------------------------------------------------------------
# (g) IOD validity


def test_ct_missing_a_type1_attribute_is_held(
    series: list[Dataset], identifiers: PatientIdentifiers
) -> None:
    del series[1].RescaleSlope
    series[2].ImageType = ""  # present but empty: still a Type 1 violation
    findings = run_rules(facts_of(series), RulesConfig(), identifiers)
    assert [(f.code, f.attribute, f.instances) for f in findings] == [
        ("iod-type1-missing", "ImageType", (series[2].SOPInstanceUID,)),
        ("iod-type1-missing", "RescaleSlope", (series[1].SOPInstanceUID,)),
    ]
    assert "Type 1 in CT Image Storage (A.3)" in findings[0].message


def test_type1_table_covers_ct_mr_seg_and_sr() -> None:
    table = type1_table()
    assert "RescaleSlope" in table["1.2.840.10008.5.1.4.1.1.2"][1]
    assert "ScanningSequence" in table["1.2.840.10008.5.1.4.1.1.4"][1]
    assert "SegmentSequence" in table["1.2.840.10008.5.1.4.1.1.66.4"][1]
    assert "ValueType" in table["1.2.840.10008.5.1.4.1.1.88.33"][1]


def test_unknown_sop_class_is_not_checked_for_type1(series: list[Dataset]) -> None:
    for ds in series:
        ds.SOPClassUID = generate_uid()
        del ds.RescaleSlope
    assert run_rules(facts_of(series), RulesConfig(), PatientIdentifiers()) == []


def test_type1_table_names_only_real_dicom_keywords() -> None:
    """The hand-transcribed PS3.3 table: a typo would silently never fire."""
    import json
    from importlib import resources

    from pydicom.datadict import tag_for_keyword

    table = json.loads(resources.files("carina.curation").joinpath("iod_type1.json").read_text())
    keywords = [k for ks in table["modules"].values() for k in ks]
    assert keywords
    assert [k for k in keywords if tag_for_keyword(k) is None] == []


def test_a_rule_that_raises_holds_the_series_and_the_other_rules_still_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from carina.curation import rules

    def broken(facts: SeriesFacts, settings: GeometrySettings) -> list[Finding]:
        raise ZeroDivisionError

    series = deidentified(ct_series(Phi(), 3))
    series[0].BurnedInAnnotation = "YES"
    monkeypatch.setattr(rules, "geometry", broken)
    findings = run_rules(facts_of(series), RulesConfig(), PatientIdentifiers())
    by_code = {f.code: f for f in findings}
    assert set(by_code) == {"burned-in-annotation", "rule-failed"}
    assert by_code["rule-failed"].severity == "hold"
    assert by_code["rule-failed"].rule == "geometry"
    assert "ZeroDivisionError" in by_code["rule-failed"].message
    assert quarantined(findings)


def test_intake_check_finds_the_original_name_and_says_only_where() -> None:
    from carina.curation.rules import instance_residual_phi

    phi = Phi()
    [original] = ct_series(phi, 1)
    original.DoseComment = "patient smitherson moved"
    identifiers = patient_identifiers(original)
    [ds] = deidentified([original])
    hits = instance_residual_phi(ds.to_json_dict(), identifiers, RulesConfig().residual_phi)
    assert hits == [("residual-phi", "a part of the patient's name", "DoseComment")]
    facts = facts_of([ds])
    findings = run_rules(facts, RulesConfig(), None, {ds.SOPInstanceUID: hits})
    assert [(f.code, f.attribute) for f in findings] == [("residual-phi", "DoseComment")]
    assert "smitherson" not in json.dumps([f.message for f in findings]).lower()


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("seen by o'brien-smith today", True),  # any case, bounded by non-letters
        ("SMITHERSON^X", True),
        ("xsmitherson", False),  # inside a word
        ("smithersons", False),
        ("smitherson2", True),  # a digit is no letter
        ("Dr Smitherson, café", True),  # non-ASCII text: the regex decides
        ("ſmitherson", True),  # long s folds to s, as in the regex
        ("", False),
    ],
)
def test_name_parts_match_whole_words_in_any_case_as_the_regex_does(text: str, found: bool) -> None:
    from carina.curation.rules import _name_parts, _name_pattern

    matchers = _name_parts(["SMITHERSON^O'BRIEN-SMITH"], 3)
    assert any(match(text) for match in matchers) is found
    patterns = [_name_pattern(p) for p in ("O'BRIEN-SMITH", "SMITHERSON")]
    assert any(p.search(text) for p in patterns) is found
