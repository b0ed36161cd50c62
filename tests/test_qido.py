"""QIDO-RS over real HTTP: PS3.18 matching, return attributes, paging and errors."""

from __future__ import annotations

import datetime as dt

import pytest
import requests

from tests.conftest import Server, wait_for_series
from tests.factory import Phi, ct_instance

pytestmark = pytest.mark.slow


def value(item: dict, tag: str) -> object:
    return item[tag]["Value"][0]


@pytest.fixture(scope="module")
def studies(server: Server) -> dict[str, dict]:
    """Three studies: two CT (one with 3 instances), one MR; keyed by what they are."""
    client = server.client()
    made = {}
    for name, modality, count, date in (
        ("ct3", "CT", 3, "20200110"),
        ("ct1", "CT", 1, "20210615"),
        ("mr", "MR", 2, "20220301"),
    ):
        phi = Phi(patient_id=f"MRN-{name}", study_date=date)
        datasets = []
        for i in range(count):
            ds = ct_instance(phi, i + 1, rows=16, columns=16)
            ds.Modality = modality
            datasets.append(ds)
        body = client.store_instances(datasets).to_json_dict()
        wait_for_series(server.database_url)
        uid = body["00081190"]["Value"][0].rsplit("/", 1)[1]
        made[name] = client.search_for_studies(search_filters={"StudyInstanceUID": uid})[0]
    return made


def qido(server: Server, path: str, **params: object) -> requests.Response:
    return server.http.get(f"{server.dicomweb}{path}", params=params, timeout=30)


def uids(r: requests.Response, tag: str = "0020000D") -> set[str]:
    return {value(i, tag) for i in r.json()} if r.status_code == 200 else set()


def test_study_search_returns_required_attributes(studies: dict, server: Server) -> None:
    r = qido(server, "/studies")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/dicom+json")
    assert len(r.json()) == 3
    ct3 = studies["ct3"]
    for tag in (
        "00080020",
        "00080030",
        "00080050",
        "00080061",
        "00080090",
        "00081190",
        "00100010",
        "00100020",
        "00100030",
        "00100040",
        "0020000D",
        "00200010",
        "00201206",
        "00201208",
    ):
        assert tag in ct3, tag
    assert ct3["00201206"]["Value"] == [1]
    assert ct3["00201208"]["Value"] == [3]


def test_match_patient_id_exactly(studies: dict, server: Server) -> None:
    pid = value(studies["ct1"], "00100020")
    assert uids(qido(server, "/studies", PatientID=pid)) == {value(studies["ct1"], "0020000D")}


def test_match_patient_name_wildcard_case_insensitive(studies: dict, server: Server) -> None:
    name = value(studies["mr"], "00100010")["Alphabetic"]
    r = qido(server, "/studies", PatientName=name[:4].lower() + "*")
    assert value(studies["mr"], "0020000D") in uids(r)
    r = qido(server, "/studies", PatientName=name[:-1] + "?")
    assert uids(r) == {value(studies["mr"], "0020000D")}


def test_match_study_date_range_and_open_ends(studies: dict, server: Server) -> None:
    dates = {k: value(s, "00080020") for k, s in studies.items()}

    def shift(d: str, days: int) -> str:
        return (dt.date(int(d[:4]), int(d[4:6]), int(d[6:])) + dt.timedelta(days)).strftime(
            "%Y%m%d"
        )

    ct1 = value(studies["ct1"], "0020000D")
    assert ct1 in uids(qido(server, "/studies", StudyDate=dates["ct1"]))
    assert ct1 in uids(
        qido(server, "/studies", StudyDate=f"{shift(dates['ct1'], -1)}-{shift(dates['ct1'], 1)}")
    )
    assert ct1 in uids(qido(server, "/studies", StudyDate=f"{dates['ct1']}-"))
    assert ct1 not in uids(qido(server, "/studies", StudyDate=f"-{shift(dates['ct1'], -1)}"))


def test_match_modalities_in_study(studies: dict, server: Server) -> None:
    assert uids(qido(server, "/studies", ModalitiesInStudy="MR")) == {
        value(studies["mr"], "0020000D")
    }
    assert len(uids(qido(server, "/studies", ModalitiesInStudy="CT"))) == 2


def test_match_uid_list(studies: dict, server: Server) -> None:
    a, b = value(studies["ct1"], "0020000D"), value(studies["mr"], "0020000D")
    assert uids(qido(server, "/studies", StudyInstanceUID=f"{a},{b}")) == {a, b}
    assert uids(qido(server, "/studies", StudyInstanceUID=f"{a}\\{b}")) == {a, b}


def test_tag_number_works_like_keyword(studies: dict, server: Server) -> None:
    pid = value(studies["ct3"], "00100020")
    assert uids(qido(server, "/studies", **{"00100020": pid})) == {
        value(studies["ct3"], "0020000D")
    }


def test_limit_offset_page_through_all_with_warning_when_cut(studies: dict, server: Server) -> None:
    first = qido(server, "/studies", limit=2)
    assert len(first.json()) == 2
    assert "additional results" in first.headers.get("warning", "")
    rest = qido(server, "/studies", limit=2, offset=2)
    assert len(rest.json()) == 1
    assert "warning" not in rest.headers
    assert uids(first) | uids(rest) == {value(s, "0020000D") for s in studies.values()}


def test_includefield_adds_attributes_from_the_instances(studies: dict, server: Server) -> None:
    r = qido(server, "/studies", ModalitiesInStudy="MR", includefield="SliceThickness,00280010")
    [item] = r.json()
    assert item["00180050"]["Value"] == [1.0]
    assert item["00280010"]["Value"] == [16]
    [every] = qido(server, "/studies", ModalitiesInStudy="MR", includefield="all").json()
    assert "00200037" in every  # ImageOrientationPatient


def test_series_level_queries(studies: dict, server: Server) -> None:
    ct3 = value(studies["ct3"], "0020000D")
    r = qido(server, f"/studies/{ct3}/series")
    [series] = r.json()
    assert series["00080060"]["Value"] == ["CT"]
    assert series["00201209"]["Value"] == [3]
    assert "00100020" not in series  # study given in the path: no study attributes
    everywhere = qido(server, "/series", Modality="MR").json()
    assert len(everywhere) == 1
    assert "00100020" in everywhere[0]  # /series returns the study's attributes too
    assert qido(server, "/series", SeriesNumber=3).status_code == 200


def test_instance_level_queries(studies: dict, server: Server) -> None:
    ct3 = value(studies["ct3"], "0020000D")
    [series] = qido(server, f"/studies/{ct3}/series").json()
    se = value(series, "0020000E")
    r = qido(server, f"/studies/{ct3}/series/{se}/instances")
    assert [value(i, "00200013") for i in r.json()] == [1, 2, 3]
    [two] = qido(server, f"/studies/{ct3}/series/{se}/instances", InstanceNumber=2).json()
    for tag in ("00080016", "00080018", "00200013", "00280010", "00280011", "00280100", "00081190"):
        assert tag in two, tag
    sop = value(two, "00080018")
    assert uids(qido(server, "/instances", SOPInstanceUID=sop), "00080018") == {sop}
    assert len(qido(server, f"/studies/{ct3}/instances").json()) == 3


def test_no_match_is_204(studies: dict, server: Server) -> None:
    r = qido(server, "/studies", PatientID="nobody-has-this-id")
    assert r.status_code == 204
    assert r.content == b""


def test_unsupported_attribute_is_ignored_with_warning(studies: dict, server: Server) -> None:
    # No matching is defined on binary values.
    r = qido(server, "/studies", PixelData="x", multiplevaluematching="true")
    assert r.status_code == 200
    assert len(r.json()) == 3
    assert "PixelData" in r.headers["warning"]


@pytest.mark.parametrize(
    "params",
    [
        {"StudyDate": "2020"},
        {"StudyDate": "20200101-2021"},
        {"StudyDate": "-"},
        {"StudyTime": "25x"},
        {"limit": "-1"},
        {"limit": "ten"},
        {"offset": "-5"},
        {"NoSuchAttribute": "1"},
        {"includefield": "NotAKeyword"},
        {"SOPInstanceUID": "1.2.3"},
    ],
)
def test_malformed_query_is_400_with_reason(studies: dict, server: Server, params: dict) -> None:
    r = qido(server, "/studies", **params)
    assert r.status_code == 400, r.text
    assert r.json()["error"]


def test_series_number_must_be_an_integer(studies: dict, server: Server) -> None:
    assert qido(server, "/series", SeriesNumber="three").status_code == 400


def test_json_only_accept_is_honoured(studies: dict, server: Server) -> None:
    r = server.http.get(f"{server.dicomweb}/studies", headers={"Accept": "application/xml"})
    assert r.status_code == 406
