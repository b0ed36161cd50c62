"""The curator REST routes over real HTTP: the queue with its filters, a series' findings and
figures, and release, reject and reprocess, each audited, with a 4xx for what cannot apply."""

from __future__ import annotations

import pytest
import requests
from pydicom import Dataset

from tests.conftest import Server, wait_for_series
from tests.factory import Phi, burned_in_series, ct_series

pytestmark = pytest.mark.slow
DICOM = 'multipart/related; type="application/dicom"'


def stow(server: Server, datasets: list[Dataset], root: str | None = None) -> tuple[str, str]:
    """STOW one series and wait until it is decided; (study, series) as stored."""
    response = server.client(root).store_instances(datasets)
    url = str(response.ReferencedSOPSequence[0].RetrieveURL).split("/studies/", 1)[1]
    study, _, series = url.split("/")[:3]
    wait_for_series(server.database_url)
    return study, series


def missing_slice() -> list[Dataset]:
    sent = ct_series(Phi(), 4, rows=16, columns=16)
    del sent[1]
    return sent


@pytest.fixture(scope="module")
def held(server: Server) -> dict[str, tuple[str, str]]:
    """Named series: two held in `default`, one held in OTHER, one published."""
    server.create_collection("OTHER")
    return {
        "burned": stow(server, burned_in_series()),
        "gap": stow(server, missing_slice()),
        "other": stow(server, burned_in_series(), f"{server.url}/collections/OTHER/dicomweb"),
        "clean": stow(server, ct_series(Phi(), 3, rows=16, columns=16)),
    }


def api(server: Server, path: str) -> str:
    return f"{server.url}/api/curation{path}"


def listed(server: Server, **params: object) -> set[str]:
    r = server.http.get(api(server, "/queue"), params=params, timeout=30)
    assert r.status_code == 200, r.text
    return {row["series_uid"] for row in r.json()}


def test_queue_lists_held_series_with_their_findings_and_filters(
    server: Server, held: dict[str, tuple[str, str]]
) -> None:
    series = {name: uid for name, (_, uid) in held.items()}
    everything_held = {series["burned"], series["gap"], series["other"]}
    assert listed(server) == everything_held
    assert listed(server, collection="OTHER") == {series["other"]}
    assert listed(server, rule="geometry") == {series["gap"]}
    assert listed(server, rule="burned-in-annotation") == {series["burned"], series["other"]}
    assert listed(server, state="published") == {series["clean"]}
    assert listed(server, max_age=3600) == everything_held
    assert listed(server, min_age=3600) == set()
    [row] = server.http.get(api(server, "/queue"), params={"rule": "geometry"}, timeout=30).json()
    assert row["collection"] == "default" and row["instances"] == 3
    assert [f["code"] for f in row["findings"]] == ["geometry-missing-slices"]


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": "x"}, {"offset": -1}, {"state": "lost"}, {"min_age": -5}],
)
def test_bad_queue_parameters_are_4xx(server: Server, params: dict) -> None:
    r = server.http.get(api(server, "/queue"), params=params, timeout=30)
    assert r.status_code == 422
    assert r.json()["detail"]


def test_series_view_has_findings_figures_and_audit(
    server: Server, held: dict[str, tuple[str, str]]
) -> None:
    _, uid = held["gap"]
    view = server.http.get(api(server, f"/series/{uid}"), timeout=30).json()
    assert view["state"] == "quarantined"
    assert [f["code"] for f in view["findings"]] == ["geometry-missing-slices"]
    assert view["qc"]["slice_count"] == 3 and view["qc"]["spacing_uniform"] is False
    assert [(a["actor"], a["action"]) for a in view["audit"]] == [("carina-worker", "evaluate")]


def test_release_publishes_the_series_and_is_audited_once(
    server: Server, held: dict[str, tuple[str, str]]
) -> None:
    study, uid = held["burned"]
    r = server.http.post(api(server, f"/series/{uid}/release"), json={"reason": "marker only"})
    assert r.status_code == 200, r.text
    got = server.http.get(f"{server.dicomweb}/studies/{study}/series/{uid}/instances", timeout=30)
    assert got.status_code == 200 and len(got.json()) == 3
    again = server.http.post(api(server, f"/series/{uid}/release"), json={"reason": "twice"})
    assert again.status_code == 409
    assert "published" in again.json()["error"]
    audit = server.http.get(api(server, f"/series/{uid}"), timeout=30).json()["audit"]
    assert [(a["action"], a["reason"], a["after"]["state"]) for a in audit[1:]] == [
        ("release", "marker only", "published")
    ]
    assert audit[1]["actor"].startswith("tests (token ")  # the test server's admin token


def test_reject_deletes_the_series_from_store_and_index(
    server: Server, held: dict[str, tuple[str, str]]
) -> None:
    study, uid = held["gap"]
    before = {p.stem for p in (server.data_dir / "objects").rglob("*.dcm")}
    r = server.http.post(api(server, f"/series/{uid}/reject"), json={"reason": "slice lost"})
    assert r.status_code == 200, r.text
    assert r.json() == {"series_uid": uid, "state": "rejected", "deleted": 3}
    after = {p.stem for p in (server.data_dir / "objects").rglob("*.dcm")}
    assert len(before - after) == 3
    assert not any(uid in str(p) for p in (server.data_dir / "objects").rglob("*.dcm"))
    view = server.http.get(api(server, f"/series/{uid}"), timeout=30).json()
    assert view["state"] == "rejected" and view["instances"] == 0
    r = server.http.get(
        f"{server.dicomweb}/studies/{study}/series/{uid}", headers={"Accept": DICOM}
    )
    assert r.status_code == 404
    for decision in ("reject", "release", "reprocess"):
        r = server.http.post(api(server, f"/series/{uid}/{decision}"), json={"reason": "again"})
        assert r.status_code == 409, decision


def test_reprocess_after_a_settings_change_publishes_the_series(
    server: Server, held: dict[str, tuple[str, str]]
) -> None:
    study, uid = held["other"]
    server.cli("collection", "rules", "OTHER", "--set", "burned_in.enabled=false")
    r = server.http.post(api(server, f"/series/{uid}/reprocess"), json={"reason": "rules changed"})
    assert r.status_code == 202, r.text
    assert wait_for_series(server.database_url)[uid] == "published"
    actions = [a["action"] for a in server.http.get(api(server, f"/series/{uid}")).json()["audit"]]
    assert actions == ["evaluate", "reprocess", "evaluate"]


@pytest.mark.parametrize("decision", ["release", "reject", "reprocess"])
def test_decisions_on_unknown_series_or_without_a_reason_are_4xx(
    server: Server, held: dict[str, tuple[str, str]], decision: str
) -> None:
    r = server.http.post(api(server, f"/series/1.2.3.999/{decision}"), json={"reason": "x"})
    assert r.status_code == 404
    assert "no series 1.2.3.999" in r.json()["error"]
    _, uid = held["clean"]
    for body in ({}, {"reason": ""}, {"reason": 5 * [1]}):
        r = server.http.post(api(server, f"/series/{uid}/{decision}"), json=body)
        assert r.status_code == 422, body
    assert server.http.get(api(server, "/series/1.2.3.999"), timeout=30).status_code == 404


def test_curation_needs_a_curator_of_the_series_collection(
    server: Server, held: dict[str, tuple[str, str]]
) -> None:
    _, burned = held["burned"]
    _, other = stow(server, missing_slice(), f"{server.url}/collections/OTHER/dicomweb")
    # No token: 401 with a challenge; a token that curates nothing (a reader): 403.
    r = requests.get(api(server, "/queue"), timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    reader = server.new_token("--role", "reader", "--collection", "OTHER")
    r = requests.get(api(server, "/queue"), headers={"Authorization": f"Bearer {reader}"})
    assert r.status_code == 403
    # A curator of OTHER sees only OTHER's held series; default's are not found for it.
    curator = server.new_token("--role", "curator", "--collection", "OTHER", "--name", "cu")
    auth = {"Authorization": f"Bearer {curator.strip()}"}
    queue = requests.get(api(server, "/queue"), headers=auth, timeout=30).json()
    assert {row["series_uid"] for row in queue} == {other}
    assert requests.get(api(server, f"/series/{burned}"), headers=auth).status_code == 404
    r = requests.post(
        api(server, f"/series/{burned}/release"), json={"reason": "not mine"}, headers=auth
    )
    assert r.status_code == 404
    view = requests.get(api(server, f"/series/{other}"), headers=auth, timeout=30)
    assert view.status_code == 200
    # Its decisions are audited under its token's name.
    r = requests.post(api(server, f"/series/{other}/reject"), json={"reason": "ok"}, headers=auth)
    assert r.status_code == 200, r.text
    actors = [e["actor"] for e in server.http.get(api(server, f"/series/{other}")).json()["audit"]]
    assert any(a.startswith("cu (token ") for a in actors), actors
