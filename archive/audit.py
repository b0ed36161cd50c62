"""The access audit: who read which study, when and through which route, exportable as CSV."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO

from psycopg_pool import ConnectionPool

COLUMNS = (
    "at",
    "identity",
    "token_id",
    "client",
    "method",
    "route",
    "study_uid",
    "collection",
    # set, and study_uid empty, where the study was forgotten (`carina subject forget`)
    "erasure_id",
)


@dataclass(frozen=True)
class Access:
    """One request as the audit names it: never its path or query, only its route template."""

    identity: str
    token_id: str | None
    client: str | None
    method: str
    route: str


def record(pool: ConnectionPool, access: Access, studies: Iterable[str]) -> None:
    """One row per distinct indexed study read by the request, with the study's collection."""
    uids = sorted(set(studies))
    if not uids:
        return
    with pool.connection() as conn:
        conn.execute(
            "INSERT INTO access_audit"
            " (identity, token_id, client, method, route, study_uid, collection)"
            " SELECT %s, %s, %s, %s, %s, s.study_uid, s.collection FROM studies s"
            " WHERE s.study_uid = ANY(%s) ORDER BY s.study_uid",
            (access.identity, access.token_id, access.client, access.method, access.route, uids),
        )


def export_csv(
    pool: ConnectionPool,
    out: TextIO,
    since: datetime | None = None,
    until: datetime | None = None,
) -> int:
    """Write the audit rows in [since, until) as CSV with a header line; return the count."""
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    n = 0
    with pool.connection() as conn, conn.transaction(), conn.cursor(name="audit") as cur:
        cur.execute(
            f"SELECT {', '.join(COLUMNS)} FROM access_audit"
            " WHERE (%(since)s::timestamptz IS NULL OR at >= %(since)s)"
            " AND (%(until)s::timestamptz IS NULL OR at < %(until)s) ORDER BY at, pk",
            {"since": since, "until": until},
        )
        for row in cur:
            writer.writerow([row[0].isoformat(), *("" if v is None else v for v in row[1:])])
            n += 1
    return n
