"""/collections/{name}/dicomweb: a complete DICOMweb root per collection (DESIGN: DICOMweb
surface). STOW stores into that collection with its own profile; QIDO and WADO see only it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Server, wait_for_series
from tests.factory import Phi, ct_series

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def roots(server: Server, database_url: str) -> dict[str, object]:
    server.create_collection("TRIAL-A", "--option", "retain_long_full_dates")
    server.create_collection("TRIAL-B", "--option", "retain_long_modified_dates")
    made: dict[str, object] = {}
    for name in ("TRIAL-A", "TRIAL-B"):
        root = f"{server.url}/collections/{name}/dicomweb"
        client = server.client(root)
        body = client.store_instances(
            ct_series(Phi(patient_id="SHARED-1", study_date="20240117"), 2)
        ).to_json_dict()
        made[name] = {
            "root": root,
            "client": client,
            "body": body,
            "study": body["00081190"]["Value"][0].rsplit("/", 1)[1],
        }
    wait_for_series(database_url)
    return made


def test_each_root_finds_only_its_own_collection(roots: dict, server: Server) -> None:
    a, b = roots["TRIAL-A"], roots["TRIAL-B"]
    assert [s["0020000D"]["Value"][0] for s in a["client"].search_for_studies()] == [a["study"]]
    assert [s["0020000D"]["Value"][0] for s in b["client"].search_for_studies()] == [b["study"]]
    everything = server.client().search_for_studies()
    assert {a["study"], b["study"]} <= {s["0020000D"]["Value"][0] for s in everything}


def test_retrieve_urls_point_into_the_collection_root(roots: dict) -> None:
    a = roots["TRIAL-A"]
    for item in a["body"]["00081199"]["Value"]:
        assert "/collections/TRIAL-A/dicomweb/studies/" in item["00081190"]["Value"][0]
    [study] = a["client"].search_for_studies()
    assert study["00081190"]["Value"][0].endswith(
        f"/collections/TRIAL-A/dicomweb/studies/{a['study']}"
    )


def test_another_collections_study_is_not_found_through_this_root(
    roots: dict, server: Server
) -> None:
    a, b = roots["TRIAL-A"], roots["TRIAL-B"]
    get = server.http.get
    for suffix in ("", "/metadata", "/series"):
        assert get(f"{b['root']}/studies/{a['study']}{suffix}").status_code in (404, 204)
    assert get(f"{b['root']}/studies/{a['study']}").status_code == 404
    assert get(f"{a['root']}/studies/{a['study']}").status_code == 200


def test_each_collection_stores_with_its_own_profile_and_keys(roots: dict) -> None:
    a, b = roots["TRIAL-A"], roots["TRIAL-B"]
    kept = a["client"].retrieve_study(a["study"])[0]
    shifted = b["client"].retrieve_study(b["study"])[0]
    assert kept.StudyDate == "20240117" != shifted.StudyDate
    assert kept.PatientID != shifted.PatientID  # one patient, two collections, two pseudonyms


def test_unknown_collection_root_is_404(roots: dict, server: Server, tmp_path: Path) -> None:
    root = f"{server.url}/collections/NO-SUCH/dicomweb"
    assert server.http.get(f"{root}/studies").status_code == 404
    body = b"--B\r\nContent-Type: application/dicom\r\n\r\nx\r\n--B--\r\n"
    r = server.http.post(
        f"{root}/studies",
        data=body,
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'},
    )
    assert r.status_code == 404
