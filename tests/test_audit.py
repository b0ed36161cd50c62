"""The access audit (issue 7): one row per study per request that read it, naming who, when
and the route (never the path), exportable as CSV with `carina audit export`."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.conftest import Server, bearer
from tests.factory import Phi, ct_series

pytestmark = pytest.mark.slow


def _export(server: Server, *args: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(server.cli("audit", "export", *args))))


def test_each_read_study_is_audited_once_per_request_and_exported(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    server = server_factory()
    for name, visibility in (("PUB", "public"), ("SECRET", "restricted")):
        server.create_collection(name, "--visibility", visibility)
    pub, _, _ = server.store(ct_series(Phi(), 2, rows=8, columns=8), "PUB")
    secret, series, _ = server.store(ct_series(Phi(), 2, rows=8, columns=8), "SECRET")
    alice = bearer(
        server.new_token("--role", "reader", "--collection", "SECRET", "--name", "alice")
    )
    assert _export(server) == []  # storing is not reading

    def get(url: str, headers: dict[str, str], status: int) -> None:
        assert requests.get(url, headers=headers, timeout=30).status_code == status

    get(f"{server.dicomweb}/studies", alice, 200)  # both studies: two rows
    get(f"{server.root('SECRET')}/studies/{secret}/metadata", alice, 200)
    get(f"{server.dicomweb}/studies/{secret}/series/{series}", alice, 200)
    get(f"{server.dicomweb}/studies/{secret}", {}, 404)  # not read: no row
    get(f"{server.dicomweb}/studies/{pub}/series", {}, 200)

    rows = _export(server)
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
    assert _export(server, "--since", "2999-01-01") == []
    out = tmp_path / "audit.csv"
    done = server.run_cli("audit", "export", "--until", "2999-01-01", "-o", str(out))
    assert done.returncode == 0 and "exported 5 access rows" in done.stderr
    assert len(list(csv.DictReader(out.open()))) == 5
