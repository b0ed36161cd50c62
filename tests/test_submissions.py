"""Submission reports: a STOW-RS request and a C-STORE association are each a submission whose
submitter (or a curator, or an admin) reads what arrived and what became of it, with
de-identified UIDs only; other collections' reports are not found, readers may not read any;
and the curator's queue filters by submitter."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Browser, expect
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from tests.conftest import Server, create_token, free_port, run_cli
from tests.factory import Phi, burned_in_series, ct_series, to_bytes
from tests.test_curator_web import browser as chromium  # noqa: F401 - a fixture: Debian's chromium

pytestmark = pytest.mark.slow
MULTIPART = 'multipart/related; type="application/dicom"; boundary=XyZ'
COLLECTION = "SITE-SUB"
OTHER = "OTHER-SUB"
SITE_AE = "SUBSITE"  # the AE title a site sends by C-STORE from


@dataclass(frozen=True)
class Setup:
    server: Server
    port: int
    tokens: dict[str, str]

    def get(self, who: str, path: str, **params: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who in self.tokens else {}
        return requests.get(self.server.url + path, params=params, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def setup(
    server_factory: Callable[..., Server],
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Setup:
    port = free_port()
    server = server_factory(CARINA_DIMSE_PORT=str(port))
    cwd = tmp_path_factory.mktemp("cli")
    for args in (
        ("collection", "create", COLLECTION),
        ("collection", "create", OTHER),
        ("ae", "add", SITE_AE, "--collection", COLLECTION),
    ):
        done = run_cli(database_url, cwd, *args)
        assert done.returncode == 0, done.stderr
    tokens = {
        "submitter": create_token(
            database_url, cwd, "--role", "submitter", "--collection", COLLECTION, "--name", "siteA"
        ),
        "curator": create_token(
            database_url, cwd, "--role", "curator", "--collection", COLLECTION, "--name", "cur"
        ),
        "reader": create_token(
            database_url, cwd, "--role", "reader", "--collection", COLLECTION, "--name", "rd"
        ),
        "other": create_token(
            database_url, cwd, "--role", "submitter", "--collection", OTHER, "--name", "siteB"
        ),
        # The token of the site whose AE title is SUBSITE: it reads SUBSITE's associations.
        "subsite": create_token(
            database_url, cwd, "--role", "submitter", "--collection", COLLECTION, "--name", SITE_AE
        ),
        # Another site sending to the same collection: it sees its own requests only.
        "sibling": create_token(
            database_url, cwd, "--role", "submitter", "--collection", COLLECTION, "--name", "siteC"
        ),
        "admin": server.token,
    }
    return Setup(server, port, tokens)


def body(*parts: bytes) -> bytes:
    out = b""
    for data in parts:
        out += b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"
    return out + b"--XyZ--\r\n"


def stow(setup: Setup, who: str, collection: str, *parts: bytes) -> requests.Response:
    r = requests.post(
        f"{setup.server.url}/collections/{collection}/dicomweb/studies",
        data=body(*parts),
        headers={"Content-Type": MULTIPART, "Authorization": f"Bearer {setup.tokens[who]}"},
        timeout=60,
    )
    setup.server.settled()
    return r


def newest(setup: Setup, who: str = "admin", **params: Any) -> dict[str, Any]:
    r = setup.get(who, "/api/submissions", **params)
    assert r.status_code == 200, r.text
    return r.json()[0]  # type: ignore[no-any-return]


def assert_no_phi(phi: Phi, text: str) -> None:
    for value in phi.strings():
        assert value not in text, value


# ---------------------------------------------------------------------------------------------
# STOW-RS requests


def test_stow_request_report_says_what_arrived_and_what_became_of_it(setup: Setup) -> None:
    phi = Phi()
    clean = [to_bytes(ds) for ds in ct_series(phi, 2, rows=16, columns=16)]
    burned = [to_bytes(ds) for ds in burned_in_series(2)]
    for ds_bytes in burned:
        assert b"SMITHERSON" in ds_bytes  # planted
    r = stow(setup, "submitter", COLLECTION, *clean, b"not DICOM at all" * 10, *burned)
    assert r.status_code == 202
    summary = newest(setup, "submitter")
    assert summary["kind"] == "stow" and summary["submitter"] == "siteA"
    assert (summary["accepted"], summary["refused"], summary["series"]) == (4, 1, 2)
    assert summary["states"] == {"published": 1, "quarantined": 1}

    report = setup.get("submitter", f"/api/submissions/{summary['id']}")
    assert report.status_code == 200
    got = report.json()
    assert got["collection"] == COLLECTION and got["studies"] == 2
    assert got["refusals"] == [
        {"reason": "C000 not a DICOM Part 10 file (no DICM prefix)", "count": 1}
    ]
    states = sorted((s["state"], s["instances"], s["findings"]) for s in got["series"])
    assert states == [("published", 2, []), ("quarantined", 2, ["burned-in-annotation"])]
    # De-identified UIDs only: none of the planted values or original UIDs.
    assert_no_phi(phi, report.text)


def test_curator_and_admin_read_the_report_and_see_a_rejection(setup: Setup) -> None:
    stow(setup, "submitter", COLLECTION, *(to_bytes(ds) for ds in burned_in_series(1)))
    summary = newest(setup, "curator", collection=COLLECTION)
    [series] = setup.get("curator", f"/api/submissions/{summary['id']}").json()["series"]
    assert series["state"] == "quarantined"
    rejected = requests.post(
        f"{setup.server.url}/api/curation/series/{series['series_uid']}/reject",
        json={"reason": "burned-in name"},
        headers={"Authorization": f"Bearer {setup.tokens['curator']}"},
        timeout=30,
    )
    assert rejected.status_code == 200, rejected.text
    report = setup.get("admin", f"/api/submissions/{summary['id']}").json()
    assert [(s["state"], s["findings"]) for s in report["series"]] == [
        ("rejected", ["burned-in-annotation"])
    ]


def test_another_collections_submission_is_not_found(setup: Setup) -> None:
    stow(setup, "other", OTHER, *(to_bytes(ds) for ds in ct_series(Phi(), 1, rows=16, columns=16)))
    theirs = newest(setup, "other")
    assert theirs["collection"] == OTHER
    for who in ("submitter", "curator"):
        assert setup.get(who, f"/api/submissions/{theirs['id']}").status_code == 404
        listed = setup.get(who, "/api/submissions", limit=1000).json()
        assert theirs["id"] not in {s["id"] for s in listed}
        assert setup.get(who, "/api/submissions", collection=OTHER).json() == []
    assert setup.get("admin", f"/api/submissions/{theirs['id']}").status_code == 200


def test_a_site_sees_its_own_submissions_not_another_sites_in_the_same_collection(
    setup: Setup,
) -> None:
    one = [to_bytes(ds) for ds in ct_series(Phi(), 1, rows=16, columns=16)]
    stow(setup, "submitter", COLLECTION, *one)
    mine = newest(setup, "submitter")
    assert mine["submitter"] == "siteA"
    assert setup.get("sibling", f"/api/submissions/{mine['id']}").status_code == 404
    assert mine["id"] not in {s["id"] for s in setup.get("sibling", "/api/submissions").json()}
    assert setup.get("curator", f"/api/submissions/{mine['id']}").status_code == 200
    stow(
        setup,
        "sibling",
        COLLECTION,
        *[to_bytes(ds) for ds in ct_series(Phi(), 1, rows=16, columns=16)],
    )
    theirs = newest(setup, "sibling")
    assert theirs["submitter"] == "siteC"
    assert setup.get("submitter", f"/api/submissions/{theirs['id']}").status_code == 404


def test_readers_and_anonymous_may_not_read_reports(setup: Setup) -> None:
    r = setup.get("reader", "/api/submissions")
    assert r.status_code == 403 and "submission reports" in r.json()["error"]
    assert setup.get("reader", "/api/submissions/1").status_code == 403
    assert setup.get("nobody", "/api/submissions").status_code == 401


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("/api/submissions/999999", {}, 404),
        ("/api/submissions/0", {}, 422),
        ("/api/submissions/abc", {}, 422),
        ("/api/submissions/99999999999999999999999", {}, 422),
        ("/api/submissions", {"since": "last tuesday"}, 422),
        ("/api/submissions", {"limit": "0"}, 422),
        ("/api/submissions", {"collection": ""}, 422),
        ("/api/submissions", {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01"}, 400),
    ],
)
def test_bad_submission_requests_get_a_clear_4xx(
    setup: Setup, path: str, params: dict[str, str], status: int
) -> None:
    r = setup.get("admin", path, **params)
    assert r.status_code == status, r.text


def test_since_and_until_select_by_start(setup: Setup) -> None:
    assert setup.get("admin", "/api/submissions", since="2999-01-01T00:00:00Z").json() == []
    assert setup.get("admin", "/api/submissions", until="2000-01-01T00:00:00").json() == []
    assert setup.get("admin", "/api/submissions", since="2000-01-01").json()


# ---------------------------------------------------------------------------------------------
# C-STORE associations, and the queue by submitter


def _c_store(setup: Setup, tmp_path: Path) -> None:
    ae = AE(ae_title="SUBSITE")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", setup.port, ae_title="CARINA")
    assert assoc.is_established
    for ds in [*ct_series(Phi(), 2, rows=16, columns=16), *burned_in_series(2)]:
        assert assoc.send_c_store(ds).Status in (0x0000, 0xB000)
    assoc.release()


def test_association_report_names_the_ae_title_and_its_series(setup: Setup, tmp_path: Path) -> None:
    _c_store(setup, tmp_path)
    deadline = time.monotonic() + 30
    while True:
        summary = newest(setup, "curator", submitter="SUBSITE")
        if summary["ended_at"] and summary["series"] == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    setup.server.settled()
    # An association's report is the curators', the admins' and that of the submitter token
    # named after the AE title; another site's submitter token does not find it.
    assert setup.get("submitter", f"/api/submissions/{summary['id']}").status_code == 404
    mine = setup.get("subsite", f"/api/submissions/{summary['id']}")
    assert mine.status_code == 200 and mine.json()["ae_title"] == "SUBSITE"
    assert summary["id"] in {s["id"] for s in setup.get("subsite", "/api/submissions").json()}
    report = setup.get("curator", f"/api/submissions/{summary['id']}").json()
    assert (report["kind"], report["ae_title"], report["collection"]) == (
        "dimse",
        "SUBSITE",
        COLLECTION,
    )
    assert (report["accepted"], report["refused"]) == (4, 0)
    assert sorted((s["state"], s["instances"]) for s in report["series"]) == [
        ("published", 2),
        ("quarantined", 2),
    ]


def test_queue_filters_by_submitter(setup: Setup) -> None:
    def held_by(submitter: str) -> set[str]:
        r = setup.get("curator", "/api/curation/queue", submitter=submitter)
        assert r.status_code == 200, r.text
        return {row["series_uid"] for row in r.json()}

    by_ae = held_by("SUBSITE")
    by_token = held_by("siteA")
    assert by_ae and by_token and not by_ae & by_token
    report = setup.get("admin", "/api/submissions", submitter="SUBSITE").json()[0]
    held = {
        s["series_uid"]
        for s in setup.get("admin", f"/api/submissions/{report['id']}").json()["series"]
        if s["state"] == "quarantined"
    }
    assert by_ae == held
    assert held_by("nobody-at-all") == set()
    rows = setup.get("curator", "/api/curation/queue", submitter="SUBSITE").json()
    assert all(row["submitters"] == ["SUBSITE"] for row in rows)
    assert setup.get("curator", "/api/curation/queue", submitter="").status_code == 422
    assert json.dumps(rows).count("SUBSITE") == len(rows)


def test_queue_page_filters_by_submitter_in_a_browser(
    setup: Setup,
    chromium: Browser,  # noqa: F811 - the fixture imported above
) -> None:
    expected = {
        row["series_uid"]
        for row in setup.get("curator", "/api/curation/queue", submitter="SUBSITE").json()
    }
    assert expected, "the association test above left held series"
    page = chromium.new_page()
    try:
        page.goto(f"{setup.server.url}/curation/login")
        page.fill("input[name=token]", setup.tokens["curator"])
        page.click("button[type=submit]")
        expect(page.locator("table.queue")).to_be_visible()
        page.fill("input[name=submitter]", "SUBSITE")
        page.click("form.filters button[type=submit]")
        expect(page).to_have_url(re.compile(r"submitter=SUBSITE"))
        rows = page.locator("table.queue tbody tr[data-series]")
        expect(rows).to_have_count(len(expected))
        shown = {rows.nth(i).get_attribute("data-series") for i in range(rows.count())}
        assert shown == expected
        expect(page.locator("table.queue tbody")).not_to_contain_text("siteA")
    finally:
        page.close()
