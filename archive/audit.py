"""The access audit: who read which study, when and through which route, exportable as CSV
or JSON; the writers here export the curation audit (curation/audit.py) too."""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TextIO

from psycopg_pool import ConnectionPool

from . import db

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
    sql, params = insert(access, "s.study_uid = ANY(%s)")
    with db.one_statement(pool) as conn:
        conn.execute(f"{sql} ORDER BY s.study_uid", [*params, uids])


def insert(access: Access, condition: str) -> tuple[str, list[object]]:
    """The INSERT (and its parameters) of one row per study `s` of table studies for which
    condition holds; a query that reads studies runs it in a WITH clause of its own, so the
    read and its audit row are one statement and one commit."""
    return (
        "INSERT INTO access_audit"
        " (identity, token_id, client, method, route, study_uid, collection)"
        " SELECT %s, %s, %s, %s, %s, s.study_uid, s.collection FROM studies s"
        f" WHERE {condition}",
        [access.identity, access.token_id, access.client, access.method, access.route],
    )


Format = Literal["csv", "json"]
FORMATS: tuple[Format, ...] = ("csv", "json")


def stream_rows(
    pool: ConnectionPool, query: str, params: Mapping[str, Any], name: str = "export"
) -> Iterator[tuple[Any, ...]]:
    """The rows of query, read from a server-side cursor as they are consumed (an audit can
    be long: it is never held whole in memory)."""
    with pool.connection() as conn, conn.transaction(), conn.cursor(name=name) as cur:
        cur.itersize = 1000
        cur.execute(query, params)
        yield from cur


def _cell(value: Any) -> Any:
    """A value as exported: moments in ISO 8601, objects as JSON text (CSV), None empty."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else value


def encode(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], fmt: Format = "csv"
) -> Iterator[str]:
    """rows as text chunks: CSV with a header line, or a JSON array of objects (JSON values
    kept as they are, moments in ISO 8601), one chunk per row, so a caller can stream it."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        for row in itertools.chain([columns], ([_cell(v) for v in r] for r in rows)):
            writer.writerow(row)
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
        return
    yield "["
    for n, row in enumerate(rows):
        item = {
            c: v.isoformat() if isinstance(v, datetime) else v
            for c, v in zip(columns, row, strict=True)
        }
        yield ("," if n else "") + "\n" + json.dumps(item)
    yield "\n]\n"


def write(out: TextIO, columns: Sequence[str], rows: Iterable[Sequence[Any]], fmt: Format) -> int:
    """Write rows to out in fmt; return how many were written."""
    counted = _Counter(rows)
    for chunk in encode(columns, counted, fmt):
        out.write(chunk)
    return counted.n


class _Counter:
    """An iterable that counts the rows it yields."""

    def __init__(self, rows: Iterable[Sequence[Any]]) -> None:
        self._rows = rows
        self.n = 0

    def __iter__(self) -> Iterator[Sequence[Any]]:
        for row in self._rows:
            self.n += 1
            yield row


def access_rows(
    pool: ConnectionPool, since: datetime | None = None, until: datetime | None = None
) -> Iterator[tuple[Any, ...]]:
    """The access audit rows in [since, until), in COLUMNS order, oldest first."""
    return stream_rows(
        pool,
        f"SELECT {', '.join(COLUMNS)} FROM access_audit"
        " WHERE (%(since)s::timestamptz IS NULL OR at >= %(since)s)"
        " AND (%(until)s::timestamptz IS NULL OR at < %(until)s) ORDER BY at, pk",
        {"since": since, "until": until},
        "access_audit",
    )


def export_csv(
    pool: ConnectionPool,
    out: TextIO,
    since: datetime | None = None,
    until: datetime | None = None,
) -> int:
    """Write the audit rows in [since, until) as CSV with a header line; return the count."""
    return write(out, COLUMNS, access_rows(pool, since, until), "csv")
