"""Erasure of one subject (the right to be forgotten): index rows first, stored objects after.

A subject is withdrawn in one transaction: its patients, studies, series and instances rows,
every derived object that references one of its series (and, in turn, what references those),
its pseudonym mapping entry, and the Study Instance UIDs of its access-audit rows; the object
keys of the removed instances are listed in erasure_objects in the same transaction. Only then
are the objects deleted from the store. A crash between the two leaves objects that no index
row serves, and the list that finish() (from a rerun or `carina fsck --repair`) works through.

A forgotten subject stays forgotten: intake recognises a later instance of it by the keyed
digests of its erasure (in_force) and refuses it until an admin lifts the erasure (lift). An
erasure and the indexing of new instances of its collection exclude each other (an advisory
lock, exclusive for the erasure, shared for intake), so an instance arriving while a subject is
forgotten is either indexed before the erasure (and withdrawn by it) or checked after it (and
refused): none survives.

Nothing here holds or logs an identifier: the caller passes research IDs and keyed digests."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg_pool import ConnectionPool

from . import originals
from .storage import ObjectStore

log = logging.getLogger(__name__)

ORIGINAL = "original"
RESEARCH = "research"
# Objects deleted per round trip of finish().
_BATCH = 500
# First key of the advisory locks between erasures and intake (the second: the collection's
# hashtext); archive/db.py's migration lock is a single bigint key, so they never meet.
_LOCK_CLASS = 7007


@dataclass(frozen=True)
class Subject:
    """One subject of a collection as the index knows it.

    patient_ids: the research PatientIDs its instances carry (a keyed pseudonym, a mapped
    research ID, or both when some arrived before the mapping); mapping_digest: the keyed
    digest of its original PatientID, when known; forgotten: keyed digests recorded with the
    erasure so that forgetting it again is recognised; kind: what the admin gave."""

    collection: str
    kind: str
    patient_ids: frozenset[str]
    forgotten: tuple[bytes, ...]
    mapping_digest: bytes | None = None


@dataclass
class Counts:
    """What an erasure removed (or, in a dry run, would remove)."""

    patients: int = 0
    studies: int = 0
    series: int = 0
    instances: int = 0
    derived_objects: int = 0
    mapping_entries: int = 0
    audit_rows: int = 0
    curation_audit_rows: int = 0
    originals: int = 0  # identified originals kept for curation (archive/originals.py)

    @property
    def found(self) -> bool:
        """Whether the index or the mapping held anything of the subject."""
        return bool(self.patients or self.instances or self.mapping_entries)

    def as_dict(self) -> dict[str, int]:
        """The counts by name, as recorded and printed."""
        return dict(vars(self))


@dataclass(frozen=True)
class Erasure:
    """A recorded erasure: no identifier, only what kind was given, who, when and counts."""

    id: int
    at: datetime
    completed_at: datetime | None
    actor: str
    collection: str
    identifier_kind: str
    counts: dict[str, int] = field(default_factory=dict)
    forgotten: tuple[bytes, ...] = ()


def previous(pool: ConnectionPool, subject: Subject) -> Erasure | None:
    """The latest erasure of this subject, recognised by its keyed digests."""
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT id, at, completed_at, actor, collection, identifier_kind, counts, forgotten"
            " FROM subject_erasures WHERE collection = %s AND forgotten && %s::bytea[]"
            " ORDER BY id DESC LIMIT 1",
            (subject.collection, list(subject.forgotten)),
        ).fetchone()
    if row is None:
        return None
    return Erasure(*row[:7], forgotten=tuple(bytes(d) for d in row[7]))


def withdraw(
    pool: ConnectionPool,
    subject: Subject,
    actor: str,
    *,
    dry_run: bool = False,
    record_empty: bool = False,
) -> tuple[int | None, Counts]:
    """Remove the subject's index rows, derived objects, mapping entry and audit study
    references in one transaction, listing its objects for finish(); return the erasure id
    and the counts. The id is None in a dry run, and when nothing was found unless
    record_empty (the caller removes files of the subject). A dry run does the same work and
    rolls it back, so its counts are exactly what a real run would remove."""
    with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
        # Waits for intake batches of the collection being indexed, and holds off new ones.
        cur.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_CLASS, subject.collection)
        )
        counts, erasure_id = _withdraw(cur, subject, actor)
        keep = not dry_run and (counts.found or record_empty)
        if not keep:
            raise psycopg.Rollback()
    if not keep:
        return None, counts
    log.info("erasure %d withdrew %s", erasure_id, counts.as_dict())
    return erasure_id, counts


def _withdraw(cur: psycopg.Cursor, subject: Subject, actor: str) -> tuple[Counts, int]:
    counts = Counts()
    cur.execute(
        "SELECT pk FROM patients WHERE collection = %s AND patient_id = ANY(%s)"
        " ORDER BY pk FOR UPDATE",
        (subject.collection, sorted(subject.patient_ids)),
    )
    patients = [r[0] for r in cur.fetchall()]
    cur.execute(
        "SELECT study_uid FROM studies WHERE patient_pk = ANY(%s) ORDER BY study_uid FOR UPDATE",
        (patients,),
    )
    studies = [r[0] for r in cur.fetchall()]
    derived, series = _derived_closure(cur, studies)
    cur.execute(
        "INSERT INTO subject_erasures (actor, collection, identifier_kind, forgotten)"
        " VALUES (%s, %s, %s, %s) RETURNING id",
        (actor, subject.collection, subject.kind, list(subject.forgotten)),
    )
    erasure_id = int(cur.fetchone()[0])  # type: ignore[index]
    # An instance filed under another study than its series' (malformed input) still goes
    # with the subject's series.
    removed = (
        "(i.study_uid = ANY(%(studies)s) OR i.series_uid = ANY(%(series)s)"
        " OR i.sop_uid = ANY(%(derived)s))"
    )
    scope = {"studies": studies, "series": series, "derived": derived, "erasure": erasure_id}
    cur.execute(
        "INSERT INTO erasure_objects (erasure_id, sop_uid, object_key)"
        f" SELECT %(erasure)s, i.sop_uid, i.object_key FROM instances i WHERE {removed}"
        " RETURNING sop_uid",
        scope,
    )
    # Their kept originals are due at once (the caller purges them after the commit).
    counts.originals = originals.drop(cur, sop_uids=[r[0] for r in cur.fetchall()])
    cur.execute(
        "SELECT count(*) FROM derived_objects d JOIN instances i ON i.sop_uid = d.sop_uid"
        f" WHERE {removed}",
        scope,
    )
    counts.derived_objects = int(cur.fetchone()[0])  # type: ignore[index]
    # Derived rows (segments, measurements, landmarks, derived_objects) go with their
    # instance (ON DELETE CASCADE).
    cur.execute(
        f"DELETE FROM instances i WHERE {removed} RETURNING i.series_uid, i.study_uid", scope
    )
    touched = cur.fetchall()
    counts.instances = len(touched)
    series = sorted({*series, *(r[0] for r in touched)})
    studies = sorted({*studies, *(r[1] for r in touched)})
    # Rows left empty: all of the subject's, and those that only held its derived objects.
    cur.execute(
        "DELETE FROM series s WHERE (s.study_uid = ANY(%s) OR s.series_uid = ANY(%s))"
        " AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.series_uid = s.series_uid)",
        (studies, series),
    )
    counts.series = cur.rowcount
    cur.execute(
        "DELETE FROM studies s WHERE s.study_uid = ANY(%s)"
        " AND NOT EXISTS (SELECT 1 FROM series x WHERE x.study_uid = s.study_uid)"
        " AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.study_uid = s.study_uid)"
        " RETURNING s.study_uid, s.patient_pk",
        (studies,),
    )
    gone = cur.fetchall()
    counts.studies = len(gone)
    cur.execute(
        "DELETE FROM patients p WHERE p.pk = ANY(%s)"
        " AND NOT EXISTS (SELECT 1 FROM studies s WHERE s.patient_pk = p.pk)",
        (sorted({*patients, *(r[1] for r in gone)}),),
    )
    counts.patients = cur.rowcount
    # A study UID is a pseudonymous identifier of the subject, and anyone holding a copy of
    # the study could link it back: the audit keeps who read what when, not which study.
    cur.execute(
        "UPDATE access_audit SET study_uid = NULL, erasure_id = %s WHERE study_uid = ANY(%s)",
        (erasure_id, [r[0] for r in gone]),
    )
    counts.audit_rows = cur.rowcount
    # The curation audit (decisions on the subject's series) keeps what was decided, by whom and
    # why, but not which series: the one redaction its append-only trigger accepts.
    cur.execute(
        "UPDATE audit_log SET series_uid = NULL, erasure_id = %s WHERE series_uid = ANY(%s)",
        (erasure_id, series),
    )
    counts.curation_audit_rows = cur.rowcount
    counts.mapping_entries = _forget_mapping(cur, subject)
    cur.execute(
        "UPDATE subject_erasures SET counts = %s WHERE id = %s",
        (json.dumps(counts.as_dict()), erasure_id),
    )
    return counts, erasure_id


def _derived_closure(cur: psycopg.Cursor, studies: Sequence[str]) -> tuple[list[str], list[str]]:
    """The series of these studies (and of their instances, should a series row name another
    study), and the SOP Instance UIDs of every derived object that
    names one of them as its source, then of those naming the series of such objects, until
    none is added."""
    cur.execute(
        "SELECT series_uid FROM series WHERE study_uid = ANY(%(st)s)"
        " UNION SELECT series_uid FROM instances WHERE study_uid = ANY(%(st)s)",
        {"st": list(studies)},
    )
    own = {r[0] for r in cur.fetchall()}
    series = set(own)
    found: set[str] = set()
    frontier = set(series)
    while frontier:
        cur.execute(
            "SELECT sop_uid FROM derived_sources WHERE source_series_uid = ANY(%(s)s)"
            " UNION SELECT sop_uid FROM segments WHERE referenced_series_uid = ANY(%(s)s)"
            " UNION SELECT sop_uid FROM measurements WHERE source_series_uid = ANY(%(s)s)"
            " UNION SELECT sop_uid FROM landmarks WHERE source_series_uid = ANY(%(s)s)",
            {"s": sorted(frontier)},
        )
        new = {r[0] for r in cur.fetchall()} - found
        found |= new
        cur.execute(
            "SELECT DISTINCT series_uid FROM instances WHERE sop_uid = ANY(%s)", (sorted(new),)
        )
        frontier = {r[0] for r in cur.fetchall()} - series
        series |= frontier
    return sorted(found), sorted(own)


def _forget_mapping(cur: psycopg.Cursor, subject: Subject) -> int:
    """Remove the subject's pseudonym mapping entry; a new mapping version makes running
    intake workers drop the copy they hold."""
    cur.execute(
        "DELETE FROM pseudonym_mappings WHERE collection = %s"
        " AND (subject_digest = %s OR research_id = ANY(%s))",
        (subject.collection, subject.mapping_digest, sorted(subject.patient_ids)),
    )
    removed = cur.rowcount
    if removed:
        cur.execute(
            "UPDATE collections SET mapping_version = mapping_version + 1 WHERE name = %s",
            (subject.collection,),
        )
    return removed


def pending(pool: ConnectionPool) -> list[tuple[int, int]]:
    """(erasure id, objects still to delete) of every erasure not yet complete."""
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT e.id, count(o.sop_uid) FROM subject_erasures e"
            " LEFT JOIN erasure_objects o ON o.erasure_id = e.id"
            " WHERE e.completed_at IS NULL GROUP BY e.id ORDER BY e.id"
        ).fetchall()
    return [(int(i), int(n)) for i, n in rows]


def finish(pool: ConnectionPool, store: ObjectStore, erasure_id: int) -> int:
    """Delete the erasure's listed objects from the store and mark it complete; return how many
    were deleted. An object whose SOP Instance UID has an index row again (stored anew since)
    is kept. Safe to run again after a crash: it resumes where it stopped."""
    deleted = 0
    while True:
        with pool.connection() as conn:
            rows = conn.execute(
                "SELECT o.sop_uid, o.object_key,"
                " EXISTS (SELECT 1 FROM instances i WHERE i.sop_uid = o.sop_uid)"
                " FROM erasure_objects o WHERE o.erasure_id = %s ORDER BY o.sop_uid LIMIT %s",
                (erasure_id, _BATCH),
            ).fetchall()
        if not rows:
            break
        for _, key, stored_again in rows:
            if not stored_again:
                store.delete(key)
                deleted += 1
        with pool.connection() as conn:
            conn.execute(
                "DELETE FROM erasure_objects WHERE erasure_id = %s AND sop_uid = ANY(%s)",
                (erasure_id, [r[0] for r in rows]),
            )
    with pool.connection() as conn:
        conn.execute(
            "UPDATE subject_erasures SET completed_at = now() WHERE id = %s"
            " AND completed_at IS NULL",
            (erasure_id,),
        )
    log.info("erasure %d: %d stored objects deleted", erasure_id, deleted)
    return deleted


def finish_pending(pool: ConnectionPool, store: ObjectStore) -> int:
    """Finish every erasure that stopped before its objects were deleted; return how many
    objects were deleted."""
    return sum(finish(pool, store, erasure_id) for erasure_id, _ in pending(pool))


def record_files(pool: ConnectionPool, erasure_id: int, files: dict[str, int]) -> None:
    """Add counts of removed local files (staged, intake) to an erasure's record."""
    with pool.connection() as conn:
        conn.execute(
            "UPDATE subject_erasures SET counts = counts || %s::jsonb WHERE id = %s",
            (json.dumps(files), erasure_id),
        )


def hold_off(cur: psycopg.Cursor, collection: str) -> None:
    """In an intake transaction: no erasure of collection runs until it ends (see above)."""
    cur.execute("SELECT pg_advisory_xact_lock_shared(%s, hashtext(%s))", (_LOCK_CLASS, collection))


def any_in_force(cur: psycopg.Cursor, collection: str) -> bool:
    """Whether an erasure of collection is in force (no admin lifted it)."""
    cur.execute(
        "SELECT EXISTS (SELECT 1 FROM subject_erasures WHERE collection = %s"
        " AND lifted_at IS NULL)",
        (collection,),
    )
    return bool(cur.fetchone()[0])  # type: ignore[index]


def in_force(cur: psycopg.Cursor, collection: str, marks: Sequence[bytes]) -> set[bytes]:
    """Those of marks (keyed digests intake computed for its instances) that an erasure of
    collection recorded and no admin lifted."""
    if not marks:
        return set()
    cur.execute(
        "SELECT DISTINCT d FROM subject_erasures, unnest(forgotten) AS d"
        " WHERE collection = %s AND lifted_at IS NULL AND forgotten && %s::bytea[]",
        (collection, list(marks)),
    )
    return {bytes(r[0]) for r in cur.fetchall()} & set(marks)


def lift(pool: ConnectionPool, subject: Subject, actor: str) -> list[int]:
    """Let intake take the subject's instances again: mark every erasure in force of it
    lifted, by whom and when (kept with the erasure); return their ids."""
    with pool.connection() as conn:
        rows = conn.execute(
            "UPDATE subject_erasures SET lifted_at = now(), lifted_by = %s"
            " WHERE collection = %s AND lifted_at IS NULL AND forgotten && %s::bytea[]"
            " RETURNING id",
            (actor, subject.collection, list(subject.forgotten)),
        ).fetchall()
    ids = sorted(r[0] for r in rows)
    if ids:
        log.info("erasures %s lifted: intake takes the subject again", ids)
    return ids
