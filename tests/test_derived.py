"""Derived objects over real HTTP: a highdicom SEG and a TID 1500 SR are STOWed with their CT
series, indexed on intake, and found through /api/segments and /api/measurements."""

from __future__ import annotations

import copy
import csv
import io
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from tests.conftest import Server, wait_for_series
from tests.derived import build
from tests.factory import Phi

pytestmark = pytest.mark.slow
DICOM_MULTIPART = 'multipart/related; type="application/dicom"'
# PS3.15 ContentSequence is X under the Basic Profile; kept (cleaned) with this option.
KEEP_STRUCTURED_CONTENT = '["retain_long_modified_dates","clean_structured_content"]'


@dataclass(frozen=True)
class Stored:
    """The de-identified UIDs of one STOWed study: CT series, SEG and SR."""

    server: Server
    study: str
    ct_series: str
    seg_series: str
    seg_sop: str
    sr_series: str
    sr_sop: str


def _stow(server: Server, datasets: list[Dataset]) -> dict[str, tuple[str, str, str]]:
    """STOW datasets; map each SOP class to (study, series, sop) of the stored instances."""
    response = DICOMwebClient(server.dicomweb).store_instances(datasets)
    assert "FailedSOPSequence" not in response
    wait_for_series(server.database_url)
    found: dict[str, tuple[str, str, str]] = {}
    for item in response.ReferencedSOPSequence:
        parts = str(item.RetrieveURL).split("/")
        found[str(item.ReferencedSOPClassUID)] = (parts[-5], parts[-3], parts[-1])
    return found


def _store_study(server: Server) -> Stored:
    cts, seg, sr = build(Phi())
    found = _stow(server, [*cts, seg, sr])
    study, ct_series, _ = found[str(cts[0].SOPClassUID)]
    _, seg_series, seg_sop = found[str(seg.SOPClassUID)]
    _, sr_series, sr_sop = found[str(sr.SOPClassUID)]
    return Stored(server, study, ct_series, seg_series, seg_sop, sr_series, sr_sop)


@pytest.fixture(scope="module")
def default_profile(server_factory: Callable[..., Server]) -> Stored:
    """A study stored under the default collection's default profile (basic + dates)."""
    return _store_study(server_factory())


@pytest.fixture(scope="module")
def stored(server_factory: Callable[..., Server], default_profile: Stored) -> Stored:
    """A study stored by a server whose default collection keeps structured content.
    (After default_profile: both servers share the database and its default collection.)"""
    server = server_factory(CARINA_DEID_OPTIONS=KEEP_STRUCTURED_CONTENT)
    return _store_study(server)


def _get(server: Server, path: str, **params: str | int | float) -> requests.Response:
    return requests.get(f"{server.url}/api/{path}", params=params, timeout=30)


def _rows(server: Server, path: str, **params: str | int | float) -> list[dict]:
    r = _get(server, path, **params)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------- segments


def test_segment_found_by_property_type_and_category_with_label_algorithm_and_source(
    stored: Stored,
) -> None:
    rows = _rows(
        stored.server,
        "segments",
        type="SCT:108369006",  # Neoplasm
        category="SCT:49755003",  # Morphologically Abnormal Structure
        study=stored.study,
    )
    assert len(rows) == 1
    row = rows[0]
    assert row["sop_uid"] == stored.seg_sop
    assert row["series_uid"] == stored.seg_series
    assert row["segment_number"] == 1
    assert row["label"] == "Lesion 1"
    assert row["type_meaning"] == "Neoplasm"
    assert row["algorithm_type"] == "MANUAL"
    assert row["algorithm_name"] is None
    assert row["referenced_series_uid"] == stored.ct_series
    assert row["frame_count"] == 1
    assert row["retrieve_url"] == (
        f"{stored.server.dicomweb}/studies/{stored.study}/series/{stored.ct_series}"
    )


def test_segment_search_by_another_type_code_finds_nothing(stored: Stored) -> None:
    assert _rows(stored.server, "segments", type="SCT:39607008", study=stored.study) == []


def test_seg_stored_under_the_default_profile_is_indexed(default_profile: Stored) -> None:
    rows = _rows(default_profile.server, "segments", study=default_profile.study)
    assert [(r["sop_uid"], r["label"], r["type_value"]) for r in rows] == [
        (default_profile.seg_sop, "Lesion 1", "108369006")
    ]
    assert rows[0]["referenced_series_uid"] == default_profile.ct_series


# ------------------------------------------------------------------------------ measurements


def test_volume_measurement_found_by_concept_code_with_exact_value_and_unit(
    stored: Stored,
) -> None:
    rows = _rows(stored.server, "measurements", concept="SCT:118565006", study=stored.study)
    assert len(rows) == 1
    row = rows[0]
    assert row["sop_uid"] == stored.sr_sop
    assert row["value"] == 1.5
    assert (row["unit_value"], row["unit_meaning"]) == ("mm3", "cubic millimeter")
    assert row["concept_meaning"] == "Volume"
    assert row["finding_value"] == "108369006"
    assert row["tracking_id"] == "lesion 1"
    assert row["group_template"] == "1410"
    assert row["source_series_uid"] == stored.ct_series


def test_volume_measurement_found_by_value_range_in_its_unit(stored: Stored) -> None:
    rows = _rows(
        stored.server,
        "measurements",
        concept="SCT:118565006",
        min=1.0,
        max=2.0,
        unit="mm3",
        study=stored.study,
    )
    assert [(r["sop_uid"], r["value"], r["unit_value"]) for r in rows] == [
        (stored.sr_sop, 1.5, "mm3")
    ]


@pytest.mark.parametrize(
    "bounds",
    [{"min": 1.6}, {"max": 1.4}, {"min": 2, "max": 3}],
    ids=["above", "below", "window"],
)
def test_value_range_that_excludes_the_measurement_returns_empty_list(
    stored: Stored, bounds: dict[str, float]
) -> None:
    params = {"concept": "SCT:118565006", "unit": "mm3", "study": stored.study, **bounds}
    assert _rows(stored.server, "measurements", **params) == []


def test_range_in_another_unit_does_not_match(stored: Stored) -> None:
    params = {"min": 0, "max": 10, "unit": "ml", "study": stored.study}
    assert _rows(stored.server, "measurements", **params) == []


def test_csv_export_parses_and_matches_the_json_rows(stored: Stored) -> None:
    params = {"concept": "SCT:118565006", "study": stored.study}
    json_rows = _rows(stored.server, "measurements", **params)
    r = _get(stored.server, "measurements", format="csv", **params)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    csv_rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(csv_rows) == len(json_rows) == 1
    got, want = csv_rows[0], json_rows[0]
    assert float(got["value"]) == want["value"]
    for key in ("sop_uid", "concept_value", "unit_value", "source_series_uid", "retrieve_url"):
        assert got[key] == want[key]
    seg_csv = _get(stored.server, "segments", format="csv", study=stored.study).text
    assert [row["label"] for row in csv.DictReader(io.StringIO(seg_csv))] == ["Lesion 1"]


def test_retrieve_url_resolves_with_a_wado_rs_series_retrieve(stored: Stored) -> None:
    [row] = _rows(stored.server, "measurements", concept="SCT:118565006", study=stored.study)
    r = requests.get(row["retrieve_url"], headers={"Accept": DICOM_MULTIPART}, timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("multipart/related")


def test_resending_the_sr_keeps_one_row_per_measurement(stored: Stored) -> None:
    cts, seg, sr = build(Phi())
    found = _stow(stored.server, [*cts, sr])
    study, _, sr_sop = found[str(sr.SOPClassUID)]
    _stow(stored.server, [sr])
    rows = _rows(stored.server, "measurements", study=study)
    assert [r["sop_uid"] for r in rows] == [sr_sop]


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("path", "params", "says"),
    [
        ("segments", {"type": "108369006"}, "SCHEME:VALUE"),
        ("segments", {"category": "SCT:"}, "SCHEME:VALUE"),
        ("measurements", {"concept": "SCT 1"}, "SCHEME:VALUE"),
        ("measurements", {"min": "big", "unit": "mm3"}, "number"),
        ("measurements", {"max": "nan", "unit": "mm3"}, "finite"),
        ("measurements", {"min": "1"}, "unit"),
        ("measurements", {"min": "2", "max": "1", "unit": "mm3"}, "greater"),
        ("measurements", {"limit": "0"}, "between"),
        ("measurements", {"limit": "10001"}, "between"),
        ("segments", {"limit": "ten"}, "integer"),
        ("segments", {"offset": "-1"}, "between"),
        ("segments", {"study": "not-a-uid"}, "UID"),
        ("segments", {"format": "xml"}, "json or csv"),
        ("segments", {"colour": "red"}, "unknown"),
    ],
)
def test_bad_parameters_answer_400_with_a_sentence(
    stored: Stored, path: str, params: dict[str, str], says: str
) -> None:
    r = _get(stored.server, path, **params)
    assert r.status_code == 400
    assert says in r.json()["error"]


def test_limit_and_offset_page_through_the_rows(stored: Stored) -> None:
    assert _rows(stored.server, "segments", study=stored.study, offset=1) == []
    assert len(_rows(stored.server, "segments", limit=1)) == 1


# ------------------------------------------------------------------------ malformed SR


def _find(item: Dataset, value_type: str) -> Dataset | None:
    for child in item.get("ContentSequence", []):
        if child.ValueType == value_type:
            return child
        found = _find(child, value_type)
        if found is not None:
            return found
    return None


def test_sr_whose_content_tree_highdicom_refuses_is_stored_but_indexes_nothing(
    stored: Stored,
) -> None:
    cts, _, sr = build(Phi())
    bad = copy.deepcopy(sr)
    num = _find(bad, "NUM")
    assert num is not None
    del num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence  # TID 300: units required
    found = _stow(stored.server, [*cts, bad])  # STOW 200, nothing refused
    study, _, sop = found[str(bad.SOPClassUID)]
    assert _rows(stored.server, "measurements", study=study) == []
    assert requests.get(stored.server.url + "/healthz", timeout=5).ok
    assert f"derived object {sop} not indexed: AttributeError" in stored.server.log.read_text()
