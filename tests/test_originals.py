"""Identified originals kept encrypted while their series is undecided, purged by its decision
(release, reject, automatic publication, erasure), and reprocessed with another
de-identification profile: over real HTTP on a real `carina serve`, with planted PHI that the
tests look for in every file of the data directory, the database and the server log."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from playwright.sync_api import Browser, expect
from psycopg.conninfo import make_conninfo
from pydicom import Dataset

from carina.archive import db, originals
from carina.archive.originals import Area, OriginalUnreadable, Sealer, collection_key
from tests import test_curator_web
from tests.conftest import Server, create_token, run_cli, start_server
from tests.factory import Phi, ct_series
from tests.test_curator_web import log_in, page_url

# PatientSex as sent: the Basic Profile blanks it, retain_patient_characteristics keeps it.
PHI_SEX = "F"


def planted(n: int) -> Phi:
    """A subject of its own, so each test's needles are its own."""
    return Phi(
        patient_name=f"QUIGGLEBOTTOM^PERPETUA{n}^X",
        patient_id=f"MRN-ORIG-{n:05d}",
        birth_date=f"1947{n % 12 + 1:02d}11",
    )


def needles(phi: Phi) -> list[str]:
    """The planted values: name (and its parts), ID, birth date, the free-text comment."""
    parts = [p for p in phi.patient_name.split("^") if len(p) > 2]
    comment = f"follow-up for {phi.patient_name} ({phi.patient_id})"
    return [phi.patient_name, *parts, phi.patient_id, phi.birth_date, comment]


def held_series(phi: Phi) -> list[Dataset]:
    """A small CT series with the PHI planted, held for BurnedInAnnotation YES."""
    sent = ct_series(phi, 3, rows=16, columns=16)
    sent[0].BurnedInAnnotation = "YES"
    return sent


def leaks(server: Server, phi: Phi) -> dict[str, list[str]]:
    """Where the planted values are in clear: every file of the data directory (store,
    staging, intake and originals areas, keys), the server log, every database row."""
    blobs = {
        str(p.relative_to(server.data_dir)): p.read_bytes()
        for p in server.data_dir.rglob("*")
        if p.is_file()
    }
    blobs["serve.log"] = server.log.read_bytes()
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        tables = [
            r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        ]
        blobs["database"] = "\n".join(
            str(row[0])
            for t in tables
            for row in conn.execute(f'SELECT t::text FROM "{t}" t')  # noqa: S608 - table names
        ).encode()
    found = {}
    for name, data in blobs.items():
        hits = [n for n in needles(phi) if n.encode() in data]
        if hits:
            found[name] = hits
    return found


def kept(server: Server, series: str) -> list[str]:
    """File names of the originals the index keeps for a series."""
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        return [
            r[0]
            for r in conn.execute("SELECT name FROM originals WHERE series_uid = %s", (series,))
        ]


def original_path(server: Server, name: str) -> Path:
    return server.data_dir / "originals" / name[:2] / name


def wait_purged(server: Server, series: str, names: list[str], timeout: float = 30) -> None:
    """Until the series' originals have neither a row nor a file (the worker purges them)."""
    deadline = time.monotonic() + timeout
    while kept(server, series) or any(original_path(server, n).exists() for n in names):
        assert time.monotonic() < deadline, f"originals of {series} still kept"
        time.sleep(0.1)


def state(server: Server, series: str) -> str:
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        return conn.execute("SELECT state FROM series WHERE series_uid = %s", (series,)).fetchone()[
            0
        ]  # type: ignore[index]


def metadata(server: Server, series: str) -> list[dict]:
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        return [
            r[0]
            for r in conn.execute(
                "SELECT metadata FROM instances WHERE series_uid = %s ORDER BY sop_uid", (series,)
            )
        ]


def sops(server: Server, series: str) -> list[str]:
    return [m["00080018"]["Value"][0] for m in metadata(server, series)]


def decide(server: Server, series: str, decision: str, **body: object) -> object:
    return server.http.post(
        f"{server.url}/api/curation/series/{series}/{decision}",
        json={"reason": "checked", **body},
        timeout=120,
    )


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., Server]) -> Server:
    return server_factory()


def test_held_series_keeps_its_originals_encrypted_with_no_clear_phi_on_disk(
    server: Server,
) -> None:
    phi = planted(1)
    _, series, _ = server.store(held_series(phi))
    assert state(server, series) == "quarantined"
    names = kept(server, series)
    assert len(names) == 3
    for name in names:
        path = original_path(server, name)
        assert path.stat().st_size > 16 * 16 * 2  # the whole original, sealed
        assert path.stat().st_mode & 0o077 == 0  # this user's only
    assert (server.data_dir / "originals").stat().st_mode & 0o077 == 0
    assert leaks(server, phi) == {}


@pytest.mark.parametrize(("decision", "served"), [("release", 3), ("reject", 0)])
def test_release_or_reject_purges_the_originals(server: Server, decision: str, served: int) -> None:
    phi = planted(2 if decision == "release" else 3)
    study, series, _ = server.store(held_series(phi))
    names = kept(server, series)
    assert len(names) == 3
    assert decide(server, series, decision).status_code == 200
    wait_purged(server, series, names)
    assert len(server.client().search_for_instances(study, series)) == served
    assert leaks(server, phi) == {}


@contextmanager
def own_database(pg_admin_url: str) -> Iterator[str]:
    """A database no other test's server works on (the series workers of one database purge
    in their own originals area: the processes of a deployment share one)."""
    name = f"carina_originals_{secrets.token_hex(4)}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(pg_admin_url, dbname=name)
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def keeping(pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A Carina that keeps published series' originals for a day."""
    with own_database(pg_admin_url) as url:
        s = start_server(
            tmp_path_factory.mktemp("keeping") / "data", url, CARINA_ORIGINALS_RETENTION_DAYS="1"
        )
        yield s
        s.stop()


def test_automatically_published_series_keeps_its_originals_for_the_retention_only(
    server: Server, keeping: Server
) -> None:
    phi = planted(4)
    _, series, _ = server.store(ct_series(phi, 3, rows=16, columns=16))
    assert state(server, series) == "published"
    wait_purged(server, series, [])  # no retention: purged at publication

    # With a retention, published series' originals are kept for it, then purged.
    _, series, _ = keeping.store(ct_series(planted(11), 3, rows=16, columns=16))
    assert state(keeping, series) == "published"
    names = kept(keeping, series)
    assert len(names) == 3 and all(original_path(keeping, n).exists() for n in names)
    # Within it, the published series can still be de-identified again.
    r = decide(keeping, series, "reprocess", options=["retain_patient_characteristics"])
    assert r.status_code == 202, r.text
    keeping.settled()
    assert state(keeping, series) == "published"
    assert {m["00100040"]["Value"][0] for m in metadata(keeping, series)} == {PHI_SEX}
    assert sorted(kept(keeping, series)) == sorted(names)
    with psycopg.connect(keeping.database_url) as conn:  # type: ignore[arg-type]
        conn.execute(  # as if published two days ago
            "UPDATE originals SET purge_after = now() - interval '2 days' WHERE series_uid = %s",
            (series,),
        )
    wait_purged(keeping, series, names)
    assert leaks(server, phi) == {}


def test_reprocess_with_another_profile_keeps_what_it_keeps_and_the_uids(
    server: Server,
) -> None:
    phi = planted(5)
    study, series, _ = server.store(held_series(phi))
    before = sops(server, series)
    assert not [m["00100040"] for m in metadata(server, series) if m["00100040"].get("Value")]
    options = ["retain_patient_characteristics", "retain_long_modified_dates"]  # table order
    r = decide(server, series, "reprocess", profile="basic", options=options)
    assert r.status_code == 202, r.text
    assert r.json() | {"series_uid": None} == {
        "series_uid": None,
        "state": "incoming",
        "profile": "basic",
        "options": options,
        "instances": 3,
    }
    server.settled()
    assert state(server, series) == "quarantined"  # still BurnedInAnnotation YES
    assert sops(server, series) == before  # same keys: the same UIDs
    for meta in metadata(server, series):
        assert meta["00100040"]["Value"] == [PHI_SEX]
        methods = {item["00080100"]["Value"][0] for item in meta["00120064"]["Value"]}
        assert "113108" in methods  # PS3.16 CID 7050: Retain Patient Characteristics Option
    view = server.http.get(f"{server.url}/api/curation/series/{series}", timeout=30).json()
    [audited] = [a for a in view["audit"] if a["action"] == "reprocess"]
    assert audited["after"]["deid"] == {"profile": "basic", "options": options}
    assert leaks(server, phi) == {}

    # Released, the kept attribute is served; the originals are gone, and so is a second go.
    names = kept(server, series)
    assert decide(server, series, "release").status_code == 200
    found = server.client().search_for_studies(
        search_filters={"StudyInstanceUID": study}, fields=["PatientSex"]
    )
    assert found[0]["00100040"]["Value"] == [PHI_SEX]
    served = server.client().retrieve_series(study, series)
    assert {str(ds.PatientSex) for ds in served} == {PHI_SEX}  # the stored objects too
    wait_purged(server, series, names)
    again = decide(server, series, "reprocess", options=options)
    assert again.status_code == 409
    assert "original kept for 0 of its 3 instances" in again.json()["error"]
    assert leaks(server, phi) == {}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"profile": "lenient"}, "unknown de-identification profile 'lenient'"),
        ({"options": ["retain_everything"]}, "unknown de-identification options"),
        ({"options": ["retain_uids"]}, "retain_uids"),
        ({"profile": ""}, None),
    ],
)
def test_reprocess_with_an_unknown_profile_or_option_is_refused(
    server: Server, body: dict, says: str | None
) -> None:
    _, series, _ = server.store(held_series(planted(6)))
    r = decide(server, series, "reprocess", **body)
    assert r.status_code == 422, r.text
    if says:
        assert says in r.json()["error"]
    assert state(server, series) == "quarantined"


def test_tampered_original_refuses_the_reprocessing_and_changes_nothing(server: Server) -> None:
    phi = planted(7)
    _, series, _ = server.store(held_series(phi))
    path = original_path(server, kept(server, series)[1])
    sealed = bytearray(path.read_bytes())
    sealed[len(sealed) // 2] ^= 0x01
    path.write_bytes(bytes(sealed))
    before = metadata(server, series)
    r = decide(server, series, "reprocess", options=["retain_patient_characteristics"])
    assert r.status_code == 409, r.text
    assert "fails authentication" in r.json()["error"]
    assert state(server, series) == "quarantined" and metadata(server, series) == before
    view = server.http.get(f"{server.url}/api/curation/series/{series}", timeout=30).json()
    assert [a["action"] for a in view["audit"]] == ["evaluate"]
    assert leaks(server, phi) == {}


def test_sealed_original_needs_its_key_and_its_own_name(tmp_path: Path) -> None:
    original = b"DICM" + b"QUIGGLEBOTTOM^PERPETUA" * 100
    sealer = Area(tmp_path, b"k" * 32).sealer("LDCT")
    name = sealer.keep("2.25.1", original)
    sealed = sealer.path(name).read_bytes()
    assert b"QUIGGLEBOTTOM" not in sealed and sealer.read(name, "2.25.1") == original
    # Another master key, another collection's key: named as such, not decrypted to garbage.
    with pytest.raises(OriginalUnreadable, match="another originals key"):
        Area(tmp_path, b"x" * 32).sealer("LDCT").read(name, "2.25.1")
    with pytest.raises(OriginalUnreadable, match="another originals key"):
        Area(tmp_path, b"k" * 32).sealer("OTHER").read(name, "2.25.1")
    # Filed for another instance, or under another name: fails authentication.
    with pytest.raises(OriginalUnreadable, match="fails authentication"):
        sealer.read(name, "2.25.2")
    other = Sealer(sealer.root, "LDCT", collection_key(b"k" * 32, "LDCT"))
    moved = other.path("ab" + name[2:])
    moved.parent.mkdir(exist_ok=True)
    moved.write_bytes(sealed)
    with pytest.raises(OriginalUnreadable, match="fails authentication"):
        other.read(moved.name, "2.25.1")
    # Cut short (a crash before the write reached the disk), or gone.
    sealer.path(name).write_bytes(sealed[:-1])
    with pytest.raises(OriginalUnreadable, match="fails authentication"):
        sealer.read(name, "2.25.1")
    sealer.path(name).write_bytes(sealed[:20])
    with pytest.raises(OriginalUnreadable, match="damaged"):
        sealer.read(name, "2.25.1")
    sealer.path(name).unlink()
    with pytest.raises(OriginalUnreadable, match="missing"):
        sealer.read(name, "2.25.1")


def test_sealed_original_is_whole_when_the_kernel_takes_its_writes_in_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def short_writev(fd: int, buffers: list[bytes | memoryview]) -> int:
        calls.append(len(buffers))
        return os.write(fd, bytes(buffers[0])[:1000])  # at most 1,000 bytes a call

    monkeypatch.setattr(originals.os, "writev", short_writev)
    original = bytearray(b"DICM" + secrets.token_bytes(5000))  # as the listener reads it
    sealer = Area(tmp_path, b"k" * 32).sealer("LDCT")
    pending = sealer.pending_path(tmp_path / "sender", "2.25.7")
    assert sealer.write_pending(pending, original)
    assert len(calls) > 5
    assert sealer.read_pending(pending) == original


def test_interrupted_purge_is_finished_by_the_next_worker_pass(server: Server) -> None:
    """A purge stopped after its decision committed (rows due, files still there)."""
    _, series, _ = server.store(held_series(planted(8)))
    names = kept(server, series)
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        # As a crash leaves it: rejected and marked, the worker not yet woken.
        conn.execute(
            "UPDATE originals SET purge_after = '-infinity' WHERE series_uid = %s", (series,)
        )
        conn.commit()
        assert all(original_path(server, n).exists() for n in names)
    wait_purged(server, series, names)  # the worker looks at least every 2 s


def test_fsck_reports_and_repairs_an_orphan_original(server: Server) -> None:
    orphan = server.data_dir / "originals" / "ff" / ("ff" + "0" * 30)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"CARINAO1" + bytes(64))
    old = time.time() - 2 * 3600
    os.utime(orphan, (old, old))
    cwd = server.data_dir.parent
    env = {"CARINA_SECRET_KEY": "test-key-" + server.data_dir.name}
    done = run_cli(server.database_url, cwd, "fsck", **env)  # type: ignore[arg-type]
    assert done.returncode == 1 and f"original file without an index row: {orphan.name}" in (
        done.stdout
    ), done.stdout + done.stderr
    done = run_cli(server.database_url, cwd, "fsck", "--repair", **env)  # type: ignore[arg-type]
    assert not orphan.exists(), done.stdout + done.stderr


def test_fsck_repair_finishes_purges_and_mends_the_index_of_originals(
    pg_admin_url: str, tmp_path: Path
) -> None:
    """What a crash can leave, found and mended by `carina fsck --repair` (no worker runs)."""
    area = Area(tmp_path, b"k" * 32)
    sealer = area.sealer("default")
    names = {what: sealer.keep(f"2.25.{i}", b"original") for i, what in enumerate(WHAT)}
    old = time.time() - 2 * 3600
    os.utime(sealer.path(names["orphan"]), (old, old))
    with own_database(pg_admin_url) as url:
        db.migrate(url)
        with db.open_pool(url, max_size=2) as pool, pool.connection() as conn:
            for i, what in enumerate(WHAT):
                if what != "orphan":
                    conn.execute(
                        "INSERT INTO originals (name, sop_uid, series_uid, collection, purge_after)"
                        " VALUES (%s, %s, '2.25.9', 'default', %s)",
                        (names[what], f"2.25.{i}", "-infinity" if what == "due" else None),
                    )
            conn.commit()
            sealer.path(names["missing"]).unlink()
            found = originals.check(pool, area)
            assert (found.due, found.missing, found.orphans, found.unowned) == (
                1,
                [names["missing"]],
                [names["orphan"]],
                2,  # neither "unowned" nor "missing" has its instance
            )
            originals.check(pool, area, repair=True)
            assert originals.check(pool, area).problems == 0
            assert not conn.execute("SELECT name FROM originals").fetchall()
    assert not list(tmp_path.glob("*/*"))


WHAT = ("due", "missing", "orphan", "unowned")


def test_forgetting_the_subject_removes_its_originals(server: Server) -> None:
    phi = planted(9)
    cwd = server.data_dir.parent
    env = {"CARINA_SECRET_KEY": "test-key-" + server.data_dir.name}
    made = run_cli(server.database_url, cwd, "collection", "create", "FORGET", **env)  # type: ignore[arg-type]
    assert made.returncode == 0, made.stderr
    _, series, _ = server.store(held_series(phi), "FORGET")
    names = kept(server, series)
    assert len(names) == 3
    done = run_cli(
        server.database_url,  # type: ignore[arg-type]
        cwd,
        "subject",
        "forget",
        "FORGET",
        "--original-id",
        stdin=phi.patient_id + "\n",
        **env,
    )
    assert done.returncode == 0, done.stderr
    assert "  kept originals: 3\n" in done.stdout, done.stdout
    assert not kept(server, series)
    assert not any(original_path(server, n).exists() for n in names)
    assert leaks(server, phi) == {}


browser = test_curator_web.browser  # Debian's chromium through Playwright (a fixture)


def test_curator_reprocesses_with_another_profile_in_the_browser(
    server: Server, browser: Browser, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _, series, _ = server.store(held_series(planted(10)))
    token = create_token(
        server.database_url,  # type: ignore[arg-type]
        tmp_path_factory.mktemp("cli"),
        "--role",
        "curator",
        "--collection",
        "default",
        "--name",
        "reprocessor",
    )
    page = browser.new_context().new_page()
    log_in(page, server, token)
    page.goto(page_url(server, f"/series/{series}"))
    page.select_option(
        "#reprocess-options", ["retain_long_modified_dates", "retain_patient_characteristics"]
    )
    page.fill("#reprocess input[name=reason]", "keep sex for the study")
    page.click("#reprocess button[type=submit]")
    expect(page).to_have_url(page_url(server, f"/series/{series}"))
    expect(page.locator("table.audit")).to_contain_text("keep sex for the study")
    server.settled()
    assert {m["00100040"]["Value"][0] for m in metadata(server, series)} == {PHI_SEX}


def test_no_planted_value_reached_postgresql_files(server: Server, pg_admin_url: str) -> None:
    """Raw bytes of the PostgreSQL data directory (tables, indexes, WAL) after the tests
    above: none of this module's planted values was ever written to the database (values
    PostgreSQL compresses are out of its sight: leaks() reads every row as text for them)."""
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        data_dir = Path(conn.execute("SHOW data_directory").fetchone()[0])  # type: ignore[index]
    if not os.access(data_dir, os.R_OK):
        pytest.skip("the PostgreSQL server's files are not on this machine (DATABASE_URL)")
    wanted = {n.encode() for i in range(1, 12) for n in needles(planted(i))}
    found = {}
    for path in data_dir.rglob("*"):
        if path.is_file() and os.access(path, os.R_OK):
            data = path.read_bytes()
            hits = [n for n in wanted if n in data]
            if hits:
                found[str(path.relative_to(data_dir))] = hits
    assert found == {}
