"""Submissions and their reports: one row per C-STORE association or STOW-RS request
(table submissions, migrations 002 and 018), linked to the series it brought.

A report says what arrived and what became of it: instances accepted and refused (with
Carina's reasons, which never quote a value of the dataset), the studies and series by their
de-identified UIDs, and each series' state with the codes of the findings that hold it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from .errors import NotFound

DIMSE = "dimse"
STOW = "stow"


def link_series(conn: Connection, submission_id: int, series: Mapping[str, int]) -> None:
    """Record how many instances of each series a submission brought (added to what it
    brought before), in conn's transaction; series no longer held are left out."""
    if not series:
        return
    uids = sorted(series)
    conn.execute(
        "INSERT INTO submission_series (submission_id, series_uid, instances)"
        " SELECT %s, u.uid, u.n FROM unnest(%s::text[], %s::int[]) AS u(uid, n)"
        " JOIN series se ON se.series_uid = u.uid WHERE u.n > 0"
        " ON CONFLICT (submission_id, series_uid)"
        " DO UPDATE SET instances = submission_series.instances + EXCLUDED.instances",
        (submission_id, uids, [series[u] for u in uids]),
    )


def add_outcomes(
    pool: ConnectionPool,
    submission_id: int,
    *,
    accepted: int,
    series: Mapping[str, int],
    refused: Mapping[str, int],
) -> None:
    """Add to a C-STORE submission what became of instances it had acknowledged, after its
    report was written or when it never was (its association cut by a restart;
    curation/admission): accepted is added to its accepted count (negative: acknowledged
    instances refused after all), refused ("<status hex> <reason>" -> count) to its refusals,
    series to the series it brought; a submission still open is closed."""
    n_refused = sum(refused.values())
    with pool.connection() as conn, conn.transaction():
        row = conn.execute(
            "SELECT reasons FROM submissions WHERE id = %s FOR UPDATE", (submission_id,)
        ).fetchone()
        if row is None:
            return
        merged = Counter(row[0] or {})
        merged.update(refused)
        conn.execute(
            "UPDATE submissions SET ended_at = coalesce(ended_at, now()),"
            " accepted = greatest(accepted + %s, 0), refused = refused + %s, reasons = %s::jsonb"
            " WHERE id = %s",
            (accepted, n_refused, json.dumps(dict(merged)), submission_id),
        )
        link_series(conn, submission_id, series)


@dataclass(frozen=True)
class StowRequest:
    """One STOW-RS request as a submission: who sent it into which collection, and what
    happened to its instances."""

    collection: str
    submitter: str  # the token's identity name
    token_id: str | None
    peer_host: str
    started_at: datetime
    accepted: int
    refused: int
    reasons: Mapping[str, int]  # "<status hex> <reason>" -> count
    series: Mapping[str, int]  # de-identified Series Instance UID -> instances stored


def record_stow(pool: ConnectionPool, request: StowRequest) -> int:
    """Record a finished STOW-RS request and the series it brought; its submission id."""
    with pool.connection() as conn, conn.transaction():
        row = conn.execute(
            "INSERT INTO submissions (kind, collection, submitter, token_id, peer_host,"
            " started_at, ended_at, accepted, refused, reasons)"
            " VALUES (%s, %s, %s, %s, %s, %s, now(), %s, %s, %s::jsonb) RETURNING id",
            (
                STOW,
                request.collection,
                request.submitter,
                request.token_id,
                request.peer_host,
                request.started_at,
                request.accepted,
                request.refused,
                json.dumps(dict(request.reasons)),
            ),
        ).fetchone()
        assert row is not None
        link_series(conn, int(row[0]), request.series)
    return int(row[0])


@dataclass(frozen=True)
class Visible:
    """The submissions a caller may see: every one of the collections it curates (None: of
    every collection, for admins), and in those it only submits to, the STOW-RS requests made
    with its own token and the C-STORE associations of the AE title its token is named after
    (a site does not see what other sites sent)."""

    collections: tuple[str, ...] | None = None
    own: tuple[str, ...] = ()
    token_id: str | None = None
    # A submitter token named after the site's AE title also reads that AE title's C-STORE
    # associations into its collections.
    ae_title: str | None = None

    def params(self) -> dict[str, Any]:
        return {
            "visible": None if self.collections is None else list(self.collections),
            "own": list(self.own),
            "token_id": self.token_id,
            "ae_title": self.ae_title,
        }


EVERY = Visible()
_VISIBLE = (
    "(%(visible)s::text[] IS NULL OR s.collection = ANY(%(visible)s)"
    " OR (s.collection = ANY(%(own)s) AND (s.token_id = %(token_id)s"
    "   OR (s.kind = 'dimse' AND s.ae_title = %(ae_title)s))))"
)


@dataclass(frozen=True)
class SubmissionFilter:
    """Which submissions to list; None matches anything. Submissions the caller may not see
    (visible) are never listed."""

    visible: Visible = EVERY
    collection: str | None = None
    submitter: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 100
    offset: int = 0


# Per submission: the series it brought and their states (one query for a whole page).
_SUMMARY = (
    "s.id, s.kind, s.collection, s.submitter, s.ae_title, s.peer_host, s.started_at,"
    " s.ended_at, s.accepted, s.refused,"
    " (SELECT count(*) FROM submission_series ss WHERE ss.submission_id = s.id) AS series,"
    " coalesce((SELECT jsonb_object_agg(x.state, x.n) FROM (SELECT se.state, count(*) AS n"
    "   FROM submission_series ss JOIN series se ON se.series_uid = ss.series_uid"
    "   WHERE ss.submission_id = s.id GROUP BY se.state) x), '{}') AS states"
)


def list_reports(pool: ConnectionPool, f: SubmissionFilter) -> list[dict[str, Any]]:
    """Summaries of the submissions matching the filter, newest first."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"SELECT {_SUMMARY} FROM submissions s"
            f" WHERE {_VISIBLE}"
            " AND (%(collection)s::text IS NULL OR s.collection = %(collection)s)"
            " AND (%(submitter)s::text IS NULL OR s.submitter = %(submitter)s)"
            " AND (%(since)s::timestamptz IS NULL OR s.started_at >= %(since)s)"
            " AND (%(until)s::timestamptz IS NULL OR s.started_at < %(until)s)"
            " ORDER BY s.id DESC LIMIT %(limit)s OFFSET %(offset)s",
            {
                **f.visible.params(),
                "collection": f.collection,
                "submitter": f.submitter,
                "since": f.since,
                "until": f.until,
                "limit": f.limit,
                "offset": f.offset,
            },
        )
        return cur.fetchall()


def report(pool: ConnectionPool, submission_id: int, visible: Visible) -> dict[str, Any]:
    """One submission's report (NotFound when there is none the caller may see)."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"SELECT {_SUMMARY}, s.reasons AS refusals FROM submissions s WHERE s.id = %(id)s"
            f" AND {_VISIBLE}",
            {"id": submission_id, **visible.params()},
        )
        found = cur.fetchone()
        if found is None:
            raise NotFound(f"no submission {submission_id}")
        cur.execute(
            "SELECT se.series_uid, se.study_uid, se.modality, ss.instances, se.state,"
            # The codes that hold (or held, before a rejection) the series; none once released.
            " coalesce((SELECT jsonb_agg(DISTINCT f.code) FROM series_findings f"
            "   WHERE f.series_uid = se.series_uid AND f.severity = 'hold'"
            "   AND se.state IN ('quarantined', 'rejected')), '[]') AS findings"
            " FROM submission_series ss JOIN series se ON se.series_uid = ss.series_uid"
            " WHERE ss.submission_id = %s ORDER BY se.study_uid, se.series_uid",
            (submission_id,),
        )
        series = cur.fetchall()
    refusals = found.pop("refusals") or {}
    found["refusals"] = [
        {"reason": reason, "count": count} for reason, count in sorted(refusals.items())
    ]
    found["studies"] = len({s["study_uid"] for s in series})
    found["series"] = series
    return found
