"""The curation audit exported as CSV and JSON: by admins (every collection) and curators
(theirs) over REST, and at the shell with `carina audit export --kind curation`."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import Server
from tests.factory import Phi, burned_in_series

pytestmark = pytest.mark.slow
A, B = "AUDIT-A", "AUDIT-B"


@dataclass(frozen=True)
class Setup:
    server: Server
    tokens: dict[str, str]
    held: dict[str, str]  # collection -> its held series

    def get(self, who: str, **kwargs: object) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}))  # type: ignore[call-overload]
        if who in self.tokens:
            headers["Authorization"] = f"Bearer {self.tokens[who]}"
        return requests.get(
            f"{self.server.url}/api/audit/curation", headers=headers, timeout=30, **kwargs
        )


@pytest.fixture(scope="module")
def setup(server_factory: Callable[..., Server]) -> Setup:
    server = server_factory()
    for name in (A, B):
        server.create_collection(name)
    tokens = {
        "admin": server.token,
        "curator": server.new_token("--role", "curator", "--collection", A, "--name", "cura"),
        "reader": server.new_token("--role", "reader", "--collection", A, "--name", "rd"),
    }
    held = {name: server.store(burned_in_series(2), name)[1] for name in (A, B)}
    for name, who, decision in ((A, "curator", "release"), (B, "admin", "reject")):
        r = requests.post(
            f"{server.url}/api/curation/series/{held[name]}/{decision}",
            json={"reason": f"{decision} after review"},
            headers={"Authorization": f"Bearer {tokens[who]}"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
    return Setup(server, tokens, held)


def rows_of(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_admin_exports_every_decision_as_csv(setup: Setup) -> None:
    r = setup.get("admin", params={"format": "csv"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    assert "curation-audit.csv" in r.headers["content-disposition"]
    rows = rows_of(r.text)
    actions = {(row["collection"], row["action"]) for row in rows}
    assert {(A, "evaluate"), (A, "release"), (B, "evaluate"), (B, "reject")} <= actions
    [release] = [row for row in rows if row["action"] == "release"]
    assert release["series_uid"] == setup.held[A]
    assert release["reason"] == "release after review"
    assert release["actor"].startswith("cura (token ")
    assert json.loads(release["before"]) == {"state": "quarantined"}
    assert json.loads(release["after"]) == {"state": "published"}
    for value in Phi().strings()[:-3]:  # the planted values (UIDs differ per series)
        assert value not in r.text


def test_curator_exports_its_collections_rows_only_as_json(setup: Setup) -> None:
    r = setup.get("curator", headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    rows = r.json()
    assert rows and {row["collection"] for row in rows} == {A}
    assert {row["action"] for row in rows} >= {"evaluate", "release"}
    assert isinstance(rows[0]["after"], dict)
    other = setup.get("curator", params={"collection": B, "format": "csv"})
    assert rows_of(other.text) == [] and other.text.startswith("pk,at,actor")


def test_since_and_until_bound_the_export(setup: Setup) -> None:
    assert setup.get("admin", params={"since": "2999-01-01T00:00:00Z"}).json() == []
    assert setup.get("admin", params={"until": "2000-01-01"}).json() == []
    assert setup.get("admin", params={"since": "2000-01-01", "until": "2999-01-01"}).json()


@pytest.mark.parametrize(
    ("who", "kwargs", "status"),
    [
        ("nobody", {}, 401),
        ("reader", {}, 403),
        ("admin", {"params": {"since": "yesterday"}}, 422),
        ("admin", {"params": {"format": "xml"}}, 422),
        ("admin", {"params": {"since": "2026-02-01", "until": "2026-01-01"}}, 400),
        ("admin", {"headers": {"Accept": "application/vnd.apache.parquet"}}, 406),
        ("admin", {"headers": {"Accept": "image/png"}}, 406),
    ],
)
def test_bad_export_requests_get_a_clear_4xx(
    setup: Setup, who: str, kwargs: dict, status: int
) -> None:
    r = setup.get(who, **kwargs)
    assert r.status_code == status, r.text


def test_cli_exports_the_curation_audit_as_csv_and_json(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "curation.csv"
    done = setup.server.run_cli("audit", "export", "--kind", "curation", "-o", str(out))
    assert done.returncode == 0, done.stderr
    rows = rows_of(out.read_text())
    assert {row["action"] for row in rows} >= {"evaluate", "release", "reject"}
    assert f"exported {len(rows)} curation rows" in done.stderr
    done = setup.server.run_cli(
        "audit", "export", "--kind", "curation", "--format", "json", "--collection", B
    )
    assert done.returncode == 0, done.stderr
    rows_b = json.loads(done.stdout)
    assert {row["collection"] for row in rows_b} == {B}
    assert {row["action"] for row in rows_b} == {"evaluate", "reject"}


def test_cli_access_audit_is_still_the_default_and_refuses_a_collection(
    setup: Setup,
) -> None:
    done = setup.server.run_cli("audit", "export")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("at,identity,token_id")
    done = setup.server.run_cli("audit", "export", "--collection", A)
    assert done.returncode == 2 and "--kind curation" in done.stderr
