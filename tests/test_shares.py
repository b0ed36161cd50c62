"""Shared cohorts (issue 7): a versioned set of studies and series with its own DICOMweb root,
read with dicomweb-client holding only a link token; a new version leaves the old unchanged."""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from tests.conftest import Server, bearer, run_cli
from tests.factory import Phi, ct_series

pytestmark = pytest.mark.slow


@dataclass
class Cohort:
    """A share of study `whole` (collection A) and series `part` of study `split` (collection
    B, whose other series `left` is not shared); `other` (A) is outside it."""

    server: Server
    database_url: str
    share: str
    link: dict[str, str]
    whole: str
    split: str
    part: str
    left: str
    other: str

    def root(self, version: int | None = None) -> str:
        """The share's DICOMweb root: latest, or one version."""
        at = f"/versions/{version}" if version else ""
        return f"{self.server.url}/shares/{self.share}{at}/dicomweb"


def _small(phi: Phi, n: int) -> list:
    return ct_series(phi, n, rows=8, columns=8)


@pytest.fixture(scope="module")
def cohort(server_factory: Callable[..., Server], database_url: str) -> Cohort:
    server = server_factory()
    for name in ("A", "B"):
        server.create_collection(name)  # restricted
    whole, _, _ = server.store(_small(Phi(), 2), "A")
    other, _, _ = server.store(_small(Phi(), 1), "A")
    phi = Phi()
    split, part, _ = server.store(_small(phi, 2), "B")
    _, left, _ = server.store(_small(replace(phi, series_uid=generate_uid()), 1), "B")
    share = server.cli("share", "create", "cohort", "--study", whole, "--series", part).strip()
    link = server.new_token("--role", "share", "--share", share, "--expires", "1d")
    return Cohort(server, database_url, share, bearer(link), whole, split, part, left, other)


def _studies(client: DICOMwebClient) -> dict[str, dict]:
    return {s["0020000D"]["Value"][0]: s for s in client.search_for_studies()}


def test_link_token_reads_exactly_the_share_with_dicomweb_client(cohort: Cohort) -> None:
    client = DICOMwebClient(cohort.root(), headers=cohort.link)
    studies = _studies(client)
    assert set(studies) == {cohort.whole, cohort.split}
    # Counted as shared: one of the split study's two series, its two instances.
    assert studies[cohort.split]["00201206"]["Value"] == [1]
    assert studies[cohort.split]["00201208"]["Value"] == [2]
    series = client.search_for_series(cohort.split)
    assert [s["0020000E"]["Value"][0] for s in series] == [cohort.part]
    assert len(client.retrieve_study(cohort.whole)) == 2
    got = client.retrieve_study(cohort.split)
    assert {ds.SeriesInstanceUID for ds in got} == {cohort.part}
    for url in (
        f"{cohort.root()}/studies/{cohort.other}",
        f"{cohort.root()}/studies/{cohort.split}/series/{cohort.left}",
        f"{cohort.root()}/studies/{cohort.split}/series/{cohort.left}/metadata",
    ):
        assert requests.get(url, headers=cohort.link, timeout=30).status_code == 404


def test_link_token_opens_nothing_else_and_the_share_is_closed_without_it(
    cohort: Cohort,
) -> None:
    server = cohort.server
    r = requests.get(f"{server.dicomweb}/studies", headers=cohort.link, timeout=30)
    assert r.status_code == 204  # A and B are restricted: the link token reads neither
    r = requests.get(f"{server.root('A')}/studies", headers=cohort.link, timeout=30)
    assert r.status_code == 404
    assert requests.get(f"{cohort.root()}/studies", timeout=30).status_code == 404
    reader_of_a = server.new_token("--role", "reader", "--collection", "A")
    r = requests.get(f"{cohort.root()}/studies", headers=bearer(reader_of_a), timeout=30)
    assert r.status_code == 404  # the share also draws on B, which it may not read
    assert requests.get(f"{cohort.root()}/studies", headers=server.auth, timeout=30).ok
    r = requests.post(
        f"{cohort.root()}/studies",
        headers={**server.auth, "Content-Type": 'multipart/related; type="application/dicom"'},
        data=b"",
        timeout=30,
    )
    assert r.status_code == 405  # a share is read-only, even for an admin
    for path in (
        "/shares/NOT-A-SHARE/dicomweb/studies",
        f"/shares/{cohort.share}/versions/9/dicomweb/studies",
    ):
        assert requests.get(server.url + path, headers=server.auth, timeout=30).status_code == 404


def test_new_version_leaves_the_old_one_and_its_manifest_unchanged(
    cohort: Cohort, tmp_path: Path
) -> None:
    done = run_cli(
        cohort.database_url, tmp_path, "share", "update", cohort.share, "--study", cohort.other
    )
    assert done.returncode == 0, done.stderr
    latest = DICOMwebClient(cohort.root(), headers=cohort.link)
    first = DICOMwebClient(cohort.root(1), headers=cohort.link)
    assert set(_studies(latest)) == {cohort.other}
    assert set(_studies(first)) == {cohort.whole, cohort.split}

    r = requests.get(
        f"{cohort.root(1)[: -len('/dicomweb')]}/manifest", headers=cohort.link, timeout=30
    )
    assert r.status_code == 200
    manifest = r.json()
    assert (manifest["share"], manifest["name"], manifest["version"]) == (cohort.share, "cohort", 1)
    rows = manifest["instances"]
    assert len(rows) == 4 and {row["collection"] for row in rows} == {"A", "B"}
    assert {row["series_uid"] for row in rows if row["study_uid"] == cohort.split} == {cohort.part}
    for row in rows:  # each checksum is the stored object's
        stored = cohort.server.data_dir / "objects" / row["study_uid"] / row["series_uid"]
        data = (stored / f"{row['sop_uid']}.dcm").read_bytes()
        assert row["size"] == len(data) and row["sha256"] == hashlib.sha256(data).hexdigest()

    r = requests.get(
        f"{cohort.server.url}/shares/{cohort.share}/manifest",
        params={"format": "csv"},
        headers=cohort.link,
        timeout=30,
    )
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert r.headers["content-type"].startswith("text/csv")
    assert [row["study_uid"] for row in table] == [cohort.other]
    assert set(table[0]) == {"study_uid", "series_uid", "sop_uid", "collection", "size", "sha256"}


@pytest.mark.parametrize(
    "args",
    [("--study", "WHOLE", "--study", "1.2.3.4"), ("--study", "WHOLE", "--series", "1.2.3.4"), ()],
    ids=["unknown study", "unknown series", "nothing"],
)
def test_share_of_nothing_or_unknown_uids_is_refused(
    cohort: Cohort, tmp_path: Path, args: tuple[str, ...]
) -> None:
    args = tuple(cohort.whole if a == "WHOLE" else a for a in args)
    done = run_cli(cohort.database_url, tmp_path, "share", "create", "refused", *args)
    assert done.returncode == 1 and not done.stdout
    assert "carina:" in done.stderr
    listed = run_cli(cohort.database_url, tmp_path, "share", "list").stdout
    assert "\trefused\t" not in listed and f"{cohort.share}\tcohort" in listed


def test_share_chosen_by_a_qido_query_holds_every_matching_study(
    cohort: Cohort, tmp_path: Path
) -> None:
    query = f"ModalitiesInStudy=CT&StudyInstanceUID={cohort.whole}\\{cohort.other}"
    done = run_cli(cohort.database_url, tmp_path, "share", "create", "q", "--query", query)
    assert done.returncode == 0, done.stderr
    root = f"{cohort.server.url}/shares/{done.stdout.strip()}/dicomweb"
    assert set(_studies(DICOMwebClient(root, headers=cohort.server.auth))) == {
        cohort.whole,
        cohort.other,
    }
    for query, why in (("ModalitiesInStudy=MR", "at least one"), ("StudyDate=soon", "not valid")):
        done = run_cli(cohort.database_url, tmp_path, "share", "create", "q", "--query", query)
        assert done.returncode == 1 and why in done.stderr


def test_includefield_through_a_share_shows_only_its_instances(
    cohort: Cohort, tmp_path: Path
) -> None:
    # Only the series stored last: an instance of the study's other series comes first.
    done = run_cli(cohort.database_url, tmp_path, "share", "create", "l", "--series", cohort.left)
    assert done.returncode == 0, done.stderr
    root = f"{cohort.server.url}/shares/{done.stdout.strip()}/dicomweb"
    r = requests.get(
        f"{root}/studies", params={"includefield": "all"}, headers=cohort.server.auth, timeout=30
    )
    [study] = r.json()
    assert study["0020000E"]["Value"] == [cohort.left]


def _post(cohort: Cohort, path: str, who: dict[str, str], body: dict) -> requests.Response:
    return requests.post(
        f"{cohort.server.url}/api/shares{path}", json=body, headers=who, timeout=60
    )


def test_reader_makes_a_share_of_what_it_reads_over_http_and_opens_it_with_a_link(
    cohort: Cohort, tmp_path: Path
) -> None:
    reader_a = bearer(
        cohort.server.new_token("--role", "reader", "--collection", "A", "--name", "alice")
    )
    # B's series and a UID of nothing get one answer: the caller learns nothing of B.
    hidden = _post(
        cohort, "", reader_a, {"name": "x", "studies": [cohort.whole], "series": [cohort.part]}
    )
    missing = _post(
        cohort, "", reader_a, {"name": "x", "studies": [cohort.whole], "series": ["1.2.3.4"]}
    )
    assert hidden.status_code == missing.status_code == 400
    assert hidden.json() == missing.json()
    # A query selects among the collections the caller reads only: A's two studies, not B's.
    r = _post(cohort, "", reader_a, {"name": "mine", "query": "ModalitiesInStudy=CT"})
    assert r.status_code == 201, r.text
    made = r.json()
    assert (made["version"], made["owner"], made["collections"]) == (1, "alice", ["A"])
    assert made["created_by"].startswith("alice (token ")
    r = _post(cohort, f"/{made['share_id']}/links", reader_a, {"days": 2})
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    link = r.json()
    expires = datetime.fromisoformat(link["expires_at"])
    assert (
        timedelta(days=2) - timedelta(minutes=5) < expires - datetime.now(UTC) <= timedelta(days=2)
    )
    root = f"{cohort.server.url}/shares/{made['share_id']}"
    client = DICOMwebClient(f"{root}/dicomweb", headers=bearer(link["token"]))
    assert set(_studies(client)) == {cohort.whole, cohort.other}
    assert len(client.retrieve_study(cohort.other)) == 1

    # A new version; the first one never changes.
    r = _post(cohort, f"/{made['share_id']}/versions", reader_a, {"studies": [cohort.whole]})
    assert r.status_code == 201 and r.json()["version"] == 2
    assert set(_studies(client)) == {cohort.whole}
    first = DICOMwebClient(f"{root}/versions/1/dicomweb", headers=bearer(link["token"]))
    assert set(_studies(first)) == {cohort.whole, cohort.other}

    # Listed as the caller's own; an admin sees every share, the CLI's too.
    listed = requests.get(f"{cohort.server.url}/api/shares", headers=reader_a, timeout=30).json()
    assert [(s["share_id"], s["version"]) for s in listed] == [(made["share_id"], 2)]
    everything = requests.get(
        f"{cohort.server.url}/api/shares", headers=cohort.server.auth, timeout=30
    ).json()
    assert {made["share_id"], cohort.share} <= {s["share_id"] for s in everything}
    listed = run_cli(cohort.database_url, tmp_path, "share", "list").stdout.splitlines()
    assert f"{made['share_id']}\tmine\tversion 2\t2 instances\tA\towner alice" in listed


def test_only_the_owner_or_an_admin_changes_a_share_and_only_readers_make_them(
    cohort: Cohort,
) -> None:
    def token(*args: str) -> dict[str, str]:
        return bearer(cohort.server.new_token(*args))

    owner = token("--role", "reader", "--collection", "A", "--name", "owner")
    made = _post(cohort, "", owner, {"name": "o", "studies": [cohort.other]}).json()
    share = made["share_id"]
    someone = token("--role", "curator", "--collection", "A", "--name", "someone")
    for path, body in (
        (f"/{share}/versions", {"studies": [cohort.whole]}),
        (f"/{share}/links", {}),
    ):
        # Another's share, the CLI's share and no share at all: one answer, 404.
        for share_path in (path, path.replace(share, cohort.share), path.replace(share, "0" * 16)):
            r = _post(cohort, share_path, someone, body)
            assert r.status_code == 404, (share_path, r.status_code)
        assert _post(cohort, path, cohort.server.auth, body).status_code == 201
    assert requests.get(f"{cohort.server.url}/api/shares", headers=someone, timeout=30).json() == []
    link = _post(cohort, f"/{share}/links", owner, {}).json()["token"]
    refused = {
        "anonymous": ({}, 401),
        "submitter": (token("--role", "submitter", "--collection", "A"), 403),
        "link token": (bearer(link), 403),
    }
    for who, (headers, status) in refused.items():
        assert (
            _post(cohort, "", headers, {"name": "n", "studies": [cohort.other]}).status_code
            == status
        ), who
        assert (
            requests.get(f"{cohort.server.url}/api/shares", headers=headers, timeout=30).status_code
            == status
        )
        assert _post(cohort, f"/{share}/links", headers, {}).status_code == status, who
    for body in (
        {"name": "", "studies": [cohort.other]},
        {"name": "n", "studies": ["../x"]},
        {"name": "n", "studies": ["1" * 65]},
        {"name": "n"},
        {"name": "n", "query": "StudyDate=soon"},
    ):
        r = _post(cohort, "", owner, body)
        assert 400 <= r.status_code < 500 and r.status_code != 404, (body, r.status_code)
    for days in (0, 366, "x"):
        assert _post(cohort, f"/{share}/links", owner, {"days": days}).status_code == 422
