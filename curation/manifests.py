"""Submission manifests: the counts a submitter expects, stored per collection (manifests
table, migration 006); the latest upload applies. The series job compares them with what the
index holds (rules.check_counts) and holds the collection's series on a mismatch."""

from __future__ import annotations

from dataclasses import asdict

from psycopg import Connection
from psycopg.types.json import Jsonb

from .rules import Manifest, ManifestRow, SubmissionCounts


def store(conn: Connection, collection: str, manifest: Manifest) -> None:
    """Store a parsed manifest as the collection's current one, in conn's transaction."""
    conn.execute(
        "INSERT INTO manifests (collection, rows) VALUES (%s, %s)",
        (collection, Jsonb([asdict(r) for r in manifest.rows])),
    )


def current(conn: Connection, collection: str) -> Manifest | None:
    """The collection's latest manifest, or None."""
    row = conn.execute(
        "SELECT rows FROM manifests WHERE collection = %s ORDER BY pk DESC LIMIT 1",
        (collection,),
    ).fetchone()
    if row is None:
        return None
    return Manifest(tuple(ManifestRow(**r) for r in row[0]))


def arrived(conn: Connection, collection: str) -> SubmissionCounts:
    """What the collection holds per modality (rejected series left out): distinct patients,
    studies, series and instances, counted in SQL rather than from every instance's metadata."""
    rows = conn.execute(
        "SELECT coalesce(se.modality, ''), count(DISTINCT st.patient_pk),"
        " count(DISTINCT st.study_uid), count(DISTINCT se.series_uid), count(i.sop_uid)"
        " FROM series se JOIN studies st ON st.study_uid = se.study_uid"
        " JOIN instances i ON i.series_uid = se.series_uid"
        " WHERE st.collection = %s AND se.state <> 'rejected' GROUP BY 1",
        (collection,),
    ).fetchall()
    return SubmissionCounts({r[0]: (r[1], r[2], r[3], r[4]) for r in rows})
