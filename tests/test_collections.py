"""Collections: created from the CLI, each de-identified by its own profile and key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from carina.archive import db
from tests.conftest import Server, free_port, run_cli, wait_for_series
from tests.factory import Phi, ct_instance

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dimse(server_factory: Callable[..., Server]) -> tuple[Server, int]:
    """A server with its listener, and two collections with different date options."""
    port = free_port()
    server = server_factory(CARINA_DIMSE_PORT=str(port))
    server.create_collection(
        "FULLDATES", "--option", "retain_long_full_dates", "--description", "dates kept"
    )
    server.create_collection("SHIFTED", "--option", "retain_long_modified_dates")
    server.cli("ae", "add", "SITEF", "--collection", "FULLDATES")
    server.cli("ae", "add", "SITES", "--collection", "SHIFTED")
    return server, port


def c_store(port: int, aet: str, phi: Phi) -> None:
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="CARINA")
    assert assoc.is_established
    status = assoc.send_c_store(ct_instance(phi, 1, rows=16, columns=16))
    assoc.release()
    assert status.Status == 0xB000  # stored, coerced by de-identification


def stored(server: Server, phi: Phi) -> list:
    """The de-identified instances whose StudyDate/time match nothing original: search all."""
    client = server.client()
    return [
        client.retrieve_study(s["0020000D"]["Value"][0])[0] for s in client.search_for_studies()
    ]


def test_each_collection_is_deidentified_with_its_own_options(dimse: tuple) -> None:
    server, port = dimse
    phi_full = Phi(patient_id="SAME-PATIENT", study_date="20240117")
    phi_shift = Phi(patient_id="SAME-PATIENT", study_date="20240117")
    c_store(port, "SITEF", phi_full)
    c_store(port, "SITES", phi_shift)
    wait_for_series(server.database_url)
    by_mode = {ds.LongitudinalTemporalInformationModified: ds for ds in stored(server, phi_full)}
    kept, shifted = by_mode["UNMODIFIED"], by_mode["MODIFIED"]
    assert kept.StudyDate == "20240117"
    assert shifted.StudyDate != "20240117"
    codes = {i.CodeValue for i in kept.DeidentificationMethodCodeSequence}
    assert "113106" in codes  # Retain Longitudinal Temporal Information Full Dates Option
    # Different collections, different keys: the same patient is two pseudonyms.
    assert kept.PatientID != shifted.PatientID
    assert kept.StudyInstanceUID != shifted.StudyInstanceUID


def test_collection_list_shows_profiles(dimse: tuple, database_url: str, tmp_path: Path) -> None:
    done = run_cli(database_url, tmp_path, "collection", "list")
    assert done.returncode == 0, done.stderr
    rows = {line.split("\t")[0]: line.split("\t") for line in done.stdout.splitlines()}
    assert rows["FULLDATES"][1:3] == ["restricted", "basic+retain_long_full_dates"]
    assert "default" in rows


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("collection", "create", "FULLDATES"), "exists already"),
        (("collection", "create", "../etc"), "collection name"),
        (("collection", "create", "x" * 65), "collection name"),
        (("collection", "create", "NEW1", "--option", "retain_everything"), "unknown"),
        (("collection", "create", "NEW2", "--profile", "nonexistent"), "missing"),
        (("ae", "add", "SITEZ", "--collection", "NOSUCH"), "no collection NOSUCH"),
    ],
)
def test_cli_refuses_bad_collections_with_a_reason(
    dimse: tuple, database_url: str, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    done = run_cli(database_url, tmp_path, *args)
    assert done.returncode == 1
    assert message in done.stderr


def test_migration_adopts_collection_names_already_in_use(pg_admin_url: str) -> None:
    """Data stored before collections existed keeps its collection, now a real one."""
    from psycopg import sql

    name = "carina_premigration"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(pg_admin_url, dbname=name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version text PRIMARY KEY,"
            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, fname, text in db.migration_files():
            if version >= "004":
                break
            conn.execute(text)
            conn.execute("INSERT INTO schema_migrations VALUES (%s, %s)", (version, fname))
        conn.execute("INSERT INTO patients (collection, patient_id) VALUES ('OLD-1', 'P')")
        conn.execute("INSERT INTO ae_titles (title, collection) VALUES ('OLDAE', 'OLD-2')")
    assert "004_collections.sql" in db.migrate(url)
    with psycopg.connect(url) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM collections")}
    assert {"OLD-1", "OLD-2", "default"} <= names
