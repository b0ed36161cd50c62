"""Shared cohorts: a named set of published instances with a stable id, frozen per version.

A version records each instance it holds, with its collection, size and SHA-256 as they were
when the version was made, so a published version never changes (its manifest stays true);
changing a cohort makes a new version. Members are chosen by study or series UIDs, or by a
QIDO-RS study query, among the collections the maker may read. A share made over HTTP has an
owner (the identity that made it), who lists it and makes its next versions and link tokens.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import parse_qsl

import psycopg
from psycopg.rows import class_row
from psycopg_pool import ConnectionPool

from . import qido
from .access import EVERYTHING, Scope
from .errors import ArchiveError, NotFound
from .index import PUBLISHED

_SHARE_ID_HEX = 8  # bytes: 16 hex digits in URLs


class ShareRefused(ArchiveError):
    """A cohort that cannot be made as asked (nothing selected, unknown UIDs, ...)."""


@dataclass(frozen=True)
class ShareVersion:
    """One version of a share, as stored."""

    share_id: str
    name: str
    version: int
    created_by: str
    created_at: datetime
    instances: int
    collections: list[str]
    owner: str | None = None


@dataclass(frozen=True)
class ManifestRow:
    """One instance of a share version: where it is and what its bytes hash to."""

    study_uid: str
    series_uid: str
    sop_uid: str
    collection: str
    size: int
    sha256: str


MANIFEST_COLUMNS = ("study_uid", "series_uid", "sop_uid", "collection", "size", "sha256")
_VERSION = (
    "SELECT v.share_id, s.name, v.version, v.created_by, v.created_at,"
    " (SELECT count(*) FROM share_instances si WHERE si.share_id = v.share_id"
    "   AND si.version = v.version)::int AS instances,"
    " ARRAY(SELECT DISTINCT si.collection FROM share_instances si"
    "   WHERE si.share_id = v.share_id AND si.version = v.version ORDER BY 1) AS collections,"
    " s.owner FROM share_versions v JOIN shares s ON s.id = v.share_id"
)


def create(
    pool: ConnectionPool,
    name: str,
    *,
    created_by: str,
    studies: Sequence[str] = (),
    series: Sequence[str] = (),
    readable: Sequence[str] | None = None,
    owner: str | None = None,
) -> ShareVersion:
    """A new share, version 1, of the given published studies and series of the readable
    collections (None: every one); owner is the identity that made it over HTTP."""
    share_id = secrets.token_hex(_SHARE_ID_HEX)
    with pool.connection() as conn, conn.transaction():
        conn.execute(
            "INSERT INTO shares (id, name, owner) VALUES (%s, %s, %s)", (share_id, name, owner)
        )
        _add_version(conn, share_id, 1, created_by, studies, series, readable)
    return get(pool, share_id, 1)


def new_version(
    pool: ConnectionPool,
    share_id: str,
    *,
    created_by: str,
    studies: Sequence[str] = (),
    series: Sequence[str] = (),
    readable: Sequence[str] | None = None,
) -> ShareVersion:
    """The next version of a share, holding exactly the given studies and series of the
    readable collections (None: every one)."""
    with pool.connection() as conn, conn.transaction():
        # The share's row is locked so two updates at once make versions n+1 and n+2.
        if conn.execute("SELECT 1 FROM shares WHERE id = %s FOR UPDATE", (share_id,)).fetchone():
            (latest,) = conn.execute(  # type: ignore[misc]
                "SELECT max(version) FROM share_versions WHERE share_id = %s", (share_id,)
            ).fetchone()
        else:
            raise NotFound(f"no share {share_id}")
        version = latest + 1
        _add_version(conn, share_id, version, created_by, studies, series, readable)
    return get(pool, share_id, version)


def _add_version(
    conn: psycopg.Connection,
    share_id: str,
    version: int,
    created_by: str,
    studies: Sequence[str],
    series: Sequence[str],
    readable: Sequence[str] | None,
) -> None:
    conn.execute(
        "INSERT INTO share_versions (share_id, version, created_by) VALUES (%s, %s, %s)",
        (share_id, version, created_by),
    )
    cur = conn.execute(
        "INSERT INTO share_instances"
        " (share_id, version, sop_uid, series_uid, study_uid, collection, size, sha256)"
        " SELECT %(id)s, %(v)s, i.sop_uid, i.series_uid, i.study_uid, s.collection, i.size,"
        " i.sha256 FROM instances i JOIN series se ON se.series_uid = i.series_uid"
        " JOIN studies s ON s.study_uid = i.study_uid"
        " WHERE se.state = %(published)s"
        " AND (%(readable)s::text[] IS NULL OR s.collection = ANY(%(readable)s))"
        " AND (i.study_uid = ANY(%(studies)s) OR i.series_uid = ANY(%(series)s))"
        " RETURNING study_uid, series_uid",
        {
            "id": share_id,
            "v": version,
            "published": PUBLISHED,
            "studies": list(studies),
            "series": list(series),
            "readable": None if readable is None else list(readable),
        },
    )
    found = cur.fetchall()
    # A UID of a collection the maker may not read is missing too: the answer is the same.
    missing = (set(studies) - {r[0] for r in found}) | (set(series) - {r[1] for r in found})
    if missing:
        raise ShareRefused(f"{len(missing)} of the UIDs given name no published study or series")
    if not found:
        raise ShareRefused("a share needs at least one study or series")


def studies_matching(
    pool: ConnectionPool, params: Sequence[tuple[str, str]], scope: Scope = EVERYTHING
) -> list[str]:
    """Study Instance UIDs of every study in scope a QIDO-RS study query (PS3.18 8.3.4)
    matches, all pages; InvalidQuery for a query it cannot understand."""
    q = qido.parse_query("study", params, scope=scope)
    q.limit = qido.MAX_LIMIT
    found: list[str] = []
    while True:
        result = qido.search(pool, q, "")
        found += [item["0020000D"]["Value"][0] for item in result.items]
        if not result.more:
            return found
        q.offset += len(result.items)


def chosen_studies(
    pool: ConnectionPool, studies: Sequence[str], query: str | None, scope: Scope = EVERYTHING
) -> list[str]:
    """The studies a share is asked to hold: those named, and every study in scope that a
    QIDO-RS study query string (e.g. 'ModalitiesInStudy=CT&StudyDate=2020-') matches."""
    chosen = list(studies)
    if query is not None:
        chosen += studies_matching(pool, parse_qsl(query, keep_blank_values=True), scope)
    return chosen


def get(pool: ConnectionPool, share_id: str, version: int | None = None) -> ShareVersion:
    """A version of a share (the latest when version is None), or NotFound."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(ShareVersion)) as cur:
        cur.execute(
            f"{_VERSION} WHERE v.share_id = %s AND (%s::int IS NULL OR v.version = %s)"
            " ORDER BY v.version DESC LIMIT 1",
            (share_id, version, version),
        )
        row = cur.fetchone()
    if row is None:
        raise NotFound("no such share")
    return row


def list_all(pool: ConnectionPool, owner: str | None = None) -> list[ShareVersion]:
    """The latest version of every share (of one owner, when given), by name."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(ShareVersion)) as cur:
        cur.execute(
            f"{_VERSION} WHERE v.version = (SELECT max(version) FROM share_versions w"
            " WHERE w.share_id = v.share_id) AND (%s::text IS NULL OR s.owner = %s)"
            " ORDER BY s.name, v.share_id",
            (owner, owner),
        )
        return cur.fetchall()


def manifest(pool: ConnectionPool, share_id: str, version: int) -> list[ManifestRow]:
    """Every instance of a share version, in study, series and instance UID order."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(ManifestRow)) as cur:
        cur.execute(
            f"SELECT {', '.join(MANIFEST_COLUMNS)} FROM share_instances"
            " WHERE share_id = %s AND version = %s ORDER BY study_uid, series_uid, sop_uid",
            (share_id, version),
        )
        return cur.fetchall()
