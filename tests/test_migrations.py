"""Migrations: numbered SQL files applied in order, each once, recorded in the database."""

from __future__ import annotations

import psycopg

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
