"""The audit trail: one append-only row per decision on a series (audit_log, migration 006).

Rows are written in the transaction that makes the decision, so a decision and its record
stand or fall together; the table refuses UPDATE, DELETE and TRUNCATE (a trigger). Rows name
series by de-identified UIDs and hold Carina's own sentences and states, never PHI."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import Connection
from psycopg.rows import class_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from carina.archive import audit as access_audit

#: The actor of decisions taken by the series rules.
WORKER = "carina-worker"
#: The columns of an export, in order.
EXPORT_COLUMNS = (
    "pk",
    "at",
    "actor",
    "action",
    "series_uid",
    "collection",
    "reason",
    "before",
    "after",
    # set, and series_uid empty, where the series was forgotten (`carina subject forget`)
    "erasure_id",
)


@dataclass(frozen=True)
class AuditEntry:
    """One recorded decision."""

    pk: int
    at: datetime
    actor: str
    action: str
    series_uid: str | None
    collection: str | None
    reason: str
    before: dict[str, Any]
    after: dict[str, Any]


def record(
    conn: Connection,
    *,
    actor: str,
    action: str,
    series_uid: str | None,
    collection: str | None,
    reason: str = "",
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
) -> None:
    """Append one decision, in conn's current transaction."""
    conn.execute(
        "INSERT INTO audit_log (actor, action, series_uid, collection, reason, before, after)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (
            actor,
            action,
            series_uid,
            collection,
            reason,
            Jsonb(dict(before or {})),
            Jsonb(dict(after or {})),
        ),
    )


def entries(pool: ConnectionPool, series_uid: str | None = None) -> list[AuditEntry]:
    """The recorded decisions, oldest first (of one series when given)."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(AuditEntry)) as cur:
        cur.execute(
            "SELECT pk, at, actor, action, series_uid, collection, reason, before, after"
            " FROM audit_log WHERE %(s)s::text IS NULL OR series_uid = %(s)s ORDER BY pk",
            {"s": series_uid},
        )
        return cur.fetchall()


def export_rows(
    pool: ConnectionPool,
    since: datetime | None = None,
    until: datetime | None = None,
    collections: tuple[str, ...] | None = None,
) -> Iterator[tuple[Any, ...]]:
    """The decisions in [since, until) (of the given collections; None: all), in
    EXPORT_COLUMNS order, oldest first, read as they are consumed."""
    return access_audit.stream_rows(
        pool,
        f"SELECT {', '.join(EXPORT_COLUMNS)} FROM audit_log"
        " WHERE (%(since)s::timestamptz IS NULL OR at >= %(since)s)"
        " AND (%(until)s::timestamptz IS NULL OR at < %(until)s)"
        " AND (%(collections)s::text[] IS NULL OR collection = ANY(%(collections)s))"
        " ORDER BY pk",
        {
            "since": since,
            "until": until,
            "collections": None if collections is None else list(collections),
        },
        "curation_audit",
    )
