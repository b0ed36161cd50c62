"""DICOM peers: registered AE titles, submissions (one per accepted association), the audit
of refused associations, and what a peer may query and retrieve (its collection only). The
tables are created by migrations/002_dimse.sql."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import class_row
from psycopg_pool import ConnectionPool

from . import collections, submissions
from .errors import ArchiveError

# PS3.5 6.2: an AE title is 1 to 16 characters of the default repertoire, no backslash or control
# characters; leading and trailing spaces are not significant.
MAX_AE_TITLE = 16


class InvalidAeTitle(ArchiveError):
    """An AE title that PS3.5 does not allow."""


class AeTitleExists(ArchiveError):
    """The AE title is already registered."""


@dataclass(frozen=True)
class AeTitle:
    """An AE title allowed to push, and the collection its instances go to."""

    title: str
    collection: str
    host: str | None
    port: int | None
    created_at: datetime


@dataclass(frozen=True)
class Submission:
    """One accepted association: who pushed, when, and what happened to the instances."""

    id: int
    ae_title: str
    peer_host: str
    started_at: datetime
    ended_at: datetime | None
    accepted: int
    refused: int
    reasons: dict[str, int]


@dataclass(frozen=True)
class AssociationReject:
    """An association refused at A-ASSOCIATE time."""

    at: datetime
    calling_ae: str
    peer_host: str
    reason: str


def normalize_title(title: str) -> str:
    """The AE title without its insignificant spaces; raise InvalidAeTitle if PS3.5 forbids it."""
    value = title.strip()
    if not value or len(value) > MAX_AE_TITLE:
        raise InvalidAeTitle(f"an AE title has 1 to {MAX_AE_TITLE} characters")
    if "\\" in value or any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise InvalidAeTitle("an AE title has printable ASCII characters only, no backslash")
    return value


def add_ae_title(
    pool: ConnectionPool,
    title: str,
    collection: str,
    *,
    host: str | None = None,
    port: int | None = None,
) -> AeTitle:
    """Register an AE title for a collection; raise AeTitleExists if it is registered already."""
    title = normalize_title(title)
    try:
        with pool.connection() as conn, conn.cursor(row_factory=class_row(AeTitle)) as cur:
            cur.execute(
                "INSERT INTO ae_titles (title, collection, host, port) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (title) DO NOTHING"
                " RETURNING title, collection, host, port, created_at",
                (title, collection, host or None, port),
            )
            row = cur.fetchone()
    except psycopg.Error as e:
        if collections.is_unknown_collection(e):
            raise collections.InvalidCollection(f"no collection {collection}") from e
        raise
    if row is None:
        raise AeTitleExists(f"AE title {title} is already registered")
    return row


def get_ae_title(pool: ConnectionPool, title: str) -> AeTitle | None:
    """The registration of an AE title, or None."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(AeTitle)) as cur:
        cur.execute(
            "SELECT title, collection, host, port, created_at FROM ae_titles WHERE title = %s",
            (title.strip(),),
        )
        return cur.fetchone()


def list_ae_titles(pool: ConnectionPool) -> list[AeTitle]:
    """Every registered AE title, by title."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(AeTitle)) as cur:
        cur.execute(
            "SELECT title, collection, host, port, created_at FROM ae_titles ORDER BY title"
        )
        return cur.fetchall()


def record_reject(pool: ConnectionPool, calling_ae: str, peer_host: str, reason: str) -> None:
    """Audit an association refused at A-ASSOCIATE time."""
    with pool.connection() as conn:
        conn.execute(
            "INSERT INTO association_rejects (calling_ae, peer_host, reason) VALUES (%s, %s, %s)",
            (calling_ae, peer_host, reason),
        )


def list_rejects(pool: ConnectionPool, *, limit: int = 100) -> list[AssociationReject]:
    """The most recent refused associations, newest first."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(AssociationReject)) as cur:
        cur.execute(
            "SELECT at, calling_ae, peer_host, reason FROM association_rejects"
            " ORDER BY at DESC, id DESC LIMIT %s",
            (limit,),
        )
        return cur.fetchall()


def open_submission(
    pool: ConnectionPool, ae_title: str, peer_host: str, collection: str | None = None
) -> int:
    """Record an accepted association (its AE title is the submitter); the submission's id."""
    with pool.connection() as conn:
        row = conn.execute(
            "INSERT INTO submissions (kind, ae_title, submitter, peer_host, collection)"
            " VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (submissions.DIMSE, ae_title, ae_title, peer_host, collection),
        ).fetchone()
    assert row is not None
    return int(row[0])


def close_submission(
    pool: ConnectionPool,
    submission_id: int,
    *,
    accepted: int,
    refused: int,
    reasons: Mapping[str, int],
    series: Mapping[str, int] | None = None,
) -> None:
    """Record the end of an association, what happened to its instances and the series they
    went to (de-identified Series Instance UID -> instances stored)."""
    with pool.connection() as conn, conn.transaction():
        conn.execute(
            "UPDATE submissions SET ended_at = now(), accepted = %s, refused = %s,"
            " reasons = %s::jsonb WHERE id = %s",
            (accepted, refused, json.dumps(dict(reasons)), submission_id),
        )
        submissions.link_series(conn, submission_id, series or {})


def list_submissions(
    pool: ConnectionPool, *, ae_title: str | None = None, limit: int = 100
) -> list[Submission]:
    """The most recent associations (of one AE title, if given), newest first."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Submission)) as cur:
        cur.execute(
            "SELECT id, ae_title, peer_host, started_at, ended_at, accepted, refused, reasons"
            " FROM submissions WHERE kind = 'dimse' AND (%(ae)s::text IS NULL OR ae_title = %(ae)s)"
            " ORDER BY id DESC LIMIT %(limit)s",
            {"ae": ae_title, "limit": limit},
        )
        return cur.fetchall()
