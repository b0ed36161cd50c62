"""Migrations: numbered SQL files applied in order, each once, recorded in the database."""

from __future__ import annotations

import psycopg
import pytest

from carina.archive import db


def test_migrations_are_numbered_and_ordered() -> None:
    files = db.migration_files()
    versions = [v for v, _, _ in files]
    assert versions == sorted(versions)
    assert versions[0] == "001"
    assert len(set(versions)) == len(versions)


def test_migrate_applies_each_file_once(database_url: str) -> None:
    first = db.migrate(database_url)
    assert first == [name for _, name, _ in db.migration_files()]
    assert db.migrate(database_url) == []
    with psycopg.connect(database_url) as conn:
        recorded = [
            r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY version")
        ]
        assert recorded == first
        tables = {
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    assert {"patients", "studies", "series", "instances"} <= tables


def test_cli_migrate_reports_up_to_date(
    database_url: str, capsys: object, monkeypatch: object
) -> None:
    from carina.cli import main

    db.migrate(database_url)
    monkeypatch.setenv("DATABASE_URL", database_url)  # type: ignore[attr-defined]
    assert main(["migrate"]) == 0
    assert "up to date" in capsys.readouterr().out  # type: ignore[attr-defined]


def test_two_migrations_with_one_number_are_refused() -> None:
    import pytest

    with pytest.raises(RuntimeError, match="share number 002"):
        db.check_versions([("001", "001_a.sql"), ("002", "002_b.sql"), ("002", "002_c.sql")])


def test_lifecycle_migration_keeps_existing_series_published_and_new_ones_incoming(
    pg_admin_url: str,
) -> None:
    import secrets

    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    name = f"carina_mig006_{secrets.token_hex(3)}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(pg_admin_url, dbname=name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE schema_migrations (version text PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for version, file, text in db.migration_files():
                if version < "006":
                    conn.execute(text)
                    conn.execute("INSERT INTO schema_migrations VALUES (%s, %s)", (version, file))
            conn.execute("INSERT INTO patients (collection, patient_id) VALUES ('default', 'P')")
            conn.execute(
                "INSERT INTO studies (study_uid, patient_pk, collection)"
                " SELECT '1.2.3', pk, 'default' FROM patients"
            )
            conn.execute("INSERT INTO series (series_uid, study_uid) VALUES ('1.2.3.1', '1.2.3')")
        assert db.migrate(url)[0] == "006_lifecycle.sql"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO series (series_uid, study_uid) VALUES ('1.2.3.2', '1.2.3')")
            states = dict(conn.execute("SELECT series_uid, state FROM series").fetchall())
            assert states == {"1.2.3.1": "published", "1.2.3.2": "incoming"}
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute("UPDATE series SET state = 'lost'")
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
