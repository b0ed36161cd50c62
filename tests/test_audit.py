"""The access audit (issue 7): one row per study per request that read it, naming who, when
and the route (never the path), exportable as CSV with `carina audit export`."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.conftest import Server, create_token, run_cli
from tests.factory import Phi, ct_series

pytestmark = pytest.mark.slow


def _export(database_url: str, cwd: Path, *args: str) -> list[dict[str, str]]:
    done = run_cli(database_url, cwd, "audit", "export", *args)
    assert done.returncode == 0, done.stderr
    return list(csv.DictReader(io.StringIO(done.stdout)))


def test_each_read_study_is_audited_once_per_request_and_exported(
    server_factory: Callable[..., Server], database_url: str, tmp_path: Path
) -> None:
    server = server_factory()
    for name, visibility in (("PUB", "public"), ("SECRET", "restricted")):
        done = run_cli(
            database_url, tmp_path, "collection", "create", name, "--visibility", visibility
        )
        assert done.returncode == 0, done.stderr
    pub, _, _ = server.store(ct_series(Phi(), 2, rows=8, columns=8), "PUB")
    secret, series, _ = server.store(ct_series(Phi(), 2, rows=8, columns=8), "SECRET")
    alice = {
        "Authorization": "Bearer "
        + create_token(
            database_url, tmp_path, "--role", "reader", "--collection", "SECRET", "--name", "alice"
        )
    }
    assert _export(database_url, tmp_path) == []  # storing is not reading

    def get(url: str, headers: dict[str, str], status: int) -> None:
        assert requests.get(url, headers=headers, timeout=30).status_code == status

    get(f"{server.dicomweb}/studies", alice, 200)  # both studies: two rows
    get(f"{server.root('SECRET')}/studies/{secret}/metadata", alice, 200)
    get(f"{server.dicomweb}/studies/{secret}/series/{series}", alice, 200)
    get(f"{server.dicomweb}/studies/{secret}", {}, 404)  # not read: no row
    get(f"{server.dicomweb}/studies/{pub}/series", {}, 200)

    rows = _export(database_url, tmp_path)
    assert [
        (r["identity"], r["method"], r["route"], r["study_uid"], r["collection"]) for r in rows
    ] == [
        *sorted(
            [
                ("alice", "GET", "/dicomweb/studies", pub, "PUB"),
                ("alice", "GET", "/dicomweb/studies", secret, "SECRET"),
            ],
            key=lambda r: r[3],
        ),
        (
            "alice",
            "GET",
            "/collections/{collection}/dicomweb/studies/{study}/metadata",
            secret,
            "SECRET",
        ),
        ("alice", "GET", "/dicomweb/studies/{study}/series/{series}", secret, "SECRET"),
        ("anonymous", "GET", "/dicomweb/studies/{study}/series", pub, "PUB"),
    ]
    assert all(r["client"] == "127.0.0.1" and r["at"] for r in rows)
    assert {r["token_id"] for r in rows[:4]} == {alice["Authorization"].split("_")[1]}
    assert rows[4]["token_id"] == ""

    # --since/--until bound the export; --output writes a file.
    assert _export(database_url, tmp_path, "--since", "2999-01-01") == []
    out = tmp_path / "audit.csv"
    done = run_cli(
        database_url, tmp_path, "audit", "export", "--until", "2999-01-01", "-o", str(out)
    )
    assert done.returncode == 0 and "exported 5 access rows" in done.stderr
    assert len(list(csv.DictReader(out.open()))) == 5
