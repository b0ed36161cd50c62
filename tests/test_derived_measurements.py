"""Every field of a SEG segment and of a TID 1500 measurement group, exact, as IDC publishes
radiomics: a highdicom SEG whose segment has a type modifier, an anatomic region, an algorithm
and a tracking identifier, and a Measurement Report whose volumetric group references that
segment and its source series and holds the IBSI shape features (PS3.16 CID 7477, with UCUM
units), a derivation, a method, a finding site with laterality and a qualitative evaluation.
STOWed identified with their CT, found by code and value range with every reference remapped
onto the published series."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.conftest import Server, wait_for_series
from tests.derived import IBSI, KEEP_STRUCTURED_CONTENT, radiomics
from tests.factory import Phi, ct_series

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Stored:
    server: Server
    study: str
    ct_series: str
    seg_sop: str
    sr_sop: str


@pytest.fixture(scope="module")
def stored(server_factory: Callable[..., Server]) -> Stored:
    server = server_factory(CARINA_DEID_OPTIONS=KEEP_STRUCTURED_CONTENT)
    cts = ct_series(Phi(), 4, rows=16, columns=16)
    seg, sr = radiomics(cts)
    response = server.client().store_instances([*cts, seg, sr])
    assert "FailedSOPSequence" not in response
    server.settled()
    states = wait_for_series(server.database_url)
    urls = {
        str(i.ReferencedSOPClassUID): str(i.RetrieveURL) for i in response.ReferencedSOPSequence
    }
    study, _, ct_series_uid = urls[str(cts[0].SOPClassUID)].split("/")[-5:-2]
    assert states[ct_series_uid] == "published"
    return Stored(
        server,
        study,
        ct_series_uid,
        urls[str(seg.SOPClassUID)].split("/")[-1],
        urls[str(sr.SOPClassUID)].split("/")[-1],
    )


def _rows(s: Stored, path: str, **params: str | float) -> list[dict]:
    r = s.server.http.get(f"{s.server.url}/api/{path}", params=params, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_segment_has_its_modifier_anatomic_region_algorithm_and_tracking(stored: Stored) -> None:
    [row] = _rows(stored, "segments", study=stored.study, type="SCT:10200004")  # Liver
    assert row["sop_uid"] == stored.seg_sop
    assert row["type_modifiers"] == [{"value": "24028007", "scheme": "SCT", "meaning": "Right"}]
    assert (row["anatomic_region_value"], row["anatomic_region_meaning"]) == ("39607008", "Lung")
    assert (row["algorithm_type"], row["algorithm_name"]) == ("AUTOMATIC", "Segmenter")
    assert row["tracking_id"] == "nodule 1"
    assert row["tracking_uid"].startswith("2.")
    assert row["referenced_series_uid"] == stored.ct_series
    assert [
        r["label"] for r in _rows(stored, "segments", algorithm="Segmenter", study=stored.study)
    ] == ["Liver", "Kidney"]
    assert _rows(stored, "segments", algorithm="Other", study=stored.study) == []


def test_every_ibsi_shape_feature_is_found_with_its_code_value_and_unit(stored: Stored) -> None:
    rows = _rows(stored, "measurements", study=stored.study)
    assert [
        (
            r["concept_value"],
            r["concept_scheme"],
            r["concept_meaning"],
            r["unit_value"],
            r["unit_meaning"],
            r["value"],
        )
        for r in rows
    ] == [(code, "IBSI", meaning, unit, um, value) for code, meaning, unit, um, value in IBSI]
    for code, _, unit, _, value in IBSI:
        [found] = _rows(
            stored, "measurements", concept=f"IBSI:{code}", min=value, max=value, unit=unit
        )
        assert found["value"] == value


def test_measurement_group_fields_and_references_are_exact(stored: Stored) -> None:
    [segment] = _rows(stored, "segments", study=stored.study, type="SCT:10200004")
    rows = _rows(stored, "measurements", study=stored.study)
    for row in rows:
        assert row["sop_uid"] == stored.sr_sop
        assert (row["group_index"], row["group_template"]) == (0, "1411")
        assert row["tracking_id"] == "nodule 1"
        # The same UID in SEG and SR was remapped with the same key: the link holds.
        assert row["tracking_uid"] == segment["tracking_uid"]
        assert (row["finding_value"], row["finding_meaning"]) == ("108369006", "Neoplasm")
        assert (row["finding_site_value"], row["finding_site_meaning"]) == ("39607008", "Lung")
        assert (row["referenced_seg_sop_uid"], row["referenced_segment_number"]) == (
            stored.seg_sop,
            1,
        )
        assert row["source_series_uid"] == stored.ct_series
        assert row["retrieve_url"].endswith(f"/studies/{stored.study}/series/{stored.ct_series}")
        assert row["evaluations"] == [
            {
                "concept": {"value": "RID5972", "scheme": "RADLEX", "meaning": "Margin"},
                "value": {"value": "112136", "scheme": "DCM", "meaning": "Spiculated"},
            }
        ]
    by_code = {r["concept_value"]: r for r in rows}
    assert (by_code["L0JK"]["derivation_value"], by_code["L0JK"]["derivation_meaning"]) == (
        "56851009",
        "Maximum",
    )
    assert (by_code["RNU0"]["method_value"], by_code["RNU0"]["method_scheme"]) == ("126030", "DCM")
    assert by_code["QCFX"]["derivation_value"] is None
    assert by_code["QCFX"]["method_value"] is None


def test_measurements_found_by_source_series_finding_and_site(stored: Stored) -> None:
    by_source = _rows(stored, "measurements", source_series=stored.ct_series)
    assert len(by_source) == len(IBSI)
    assert len(_rows(stored, "measurements", finding="SCT:108369006", study=stored.study)) == len(
        IBSI
    )
    assert len(
        _rows(stored, "measurements", finding_site="SCT:39607008", study=stored.study)
    ) == len(IBSI)
    assert _rows(stored, "measurements", finding_site="SCT:10200004", study=stored.study) == []


@pytest.mark.parametrize(
    ("path", "count"),
    [("measurements", len(IBSI)), ("segments", 2), ("derived-objects", 3), ("landmarks", 0)],
)
def test_rows_found_by_the_study_of_their_source_series(
    stored: Stored, path: str, count: int
) -> None:
    rows = _rows(stored, path, source_study=stored.study)
    assert len(rows) == count
    # The SEG made from the CT; the SR made from the CT and from the SEG (its evidence).
    assert all(f"/studies/{stored.study}/series/" in r["retrieve_url"] for r in rows)
    assert _rows(stored, path, source_study="1.2.3.4") == []
