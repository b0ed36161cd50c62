"""The PostgreSQL index: patients, studies, series and instances, written in batches."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, Protocol

import psycopg
from psycopg import Connection
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from . import audit, db, jobs, originals
from .access import EVERYTHING, Scope
from .errors import NotFound

_ATTRS = json.loads(resources.files("carina.archive").joinpath("qido_attributes.json").read_text())
#: DICOM JSON keys (8 hex digits) kept at each level of the index.
PATIENT_TAGS = frozenset(_ATTRS["patient"])
STUDY_TAGS = frozenset(_ATTRS["study"])
SERIES_TAGS = frozenset(_ATTRS["series"])
INSTANCE_TAGS = frozenset(_ATTRS["instance"])

PUBLISHED = "published"
#: Where every series starts, and returns to when instances arrive after it was decided.
INCOMING = "incoming"
# Bulk loads outrun autovacuum; a planner without statistics picks plans 10x slower.
ANALYZE_EVERY = 2000


class IndexRecord(Protocol):
    """What the index needs of a stored instance (curation's InstanceRecord has it)."""

    collection: str
    sop_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax_uid: str
    size: int
    sha256: str
    instance_number: int | None
    patient: dict[str, str | None]
    study: dict[str, str | None]
    series: dict[str, str | int | None]
    patient_attrs: str
    study_attrs: str
    series_attrs: str
    metadata: str
    intake_findings: str | None
    original: str | None  # file name of its kept original, if one was kept

    @property
    def object_key(self) -> str: ...


def write_batch(
    pool: ConnectionPool,
    records: Sequence[IndexRecord],
    settle_after: float = 0.0,
    guard: Callable[[psycopg.Cursor], None] | None = None,
) -> None:
    """Upsert the patients, studies, series and instances of records in one transaction.

    Every series touched becomes incoming (hidden from QIDO/WADO until evaluated again) and its
    evaluation is (re)scheduled settle_after seconds from now, in the same transaction. guard,
    when given, runs first in that transaction (it may lock, check and raise to abort)."""
    # Last one wins when a request carries the same object twice.
    by_sop = {r.sop_uid: r for r in records}
    studies = {r.study_uid: r for r in by_sop.values()}
    series = {r.series_uid: r for r in by_sop.values()}
    patients = {(r.collection, r.patient["patient_id"]): r for r in studies.values()}
    # Pipeline mode: the statements go out together and their results come back together, so
    # the transaction costs two round trips to the server (the guard's answers, then the rest
    # with the COMMIT) instead of one per statement: a C-STORE waits for every one of them.
    with (
        pool.connection() as conn,
        conn.pipeline(),
        conn.transaction(),
        conn.cursor() as cur,
    ):
        if guard is not None:
            guard(cur)
        # Each level in one executemany, rows in sorted order so that concurrent batches lock
        # them in the same order. A study finds its patient's key by a subquery (no RETURNING
        # to wait for between the two).
        cur.executemany(
            "INSERT INTO patients"
            " (collection, patient_id, patient_name, birth_date, sex, attrs)"
            " VALUES (%s, %s, %s, %s, %s, %s::jsonb)"
            " ON CONFLICT (collection, patient_id) DO UPDATE SET"
            " patient_name = EXCLUDED.patient_name, birth_date = EXCLUDED.birth_date,"
            " sex = EXCLUDED.sex, attrs = EXCLUDED.attrs",
            [
                (
                    r.collection,
                    r.patient["patient_id"],
                    r.patient["patient_name"],
                    r.patient["birth_date"],
                    r.patient["sex"],
                    r.patient_attrs,
                )
                for _, r in sorted(patients.items())
            ],
        )
        cur.executemany(
            "INSERT INTO studies (study_uid, patient_pk, collection, study_date, study_time,"
            " accession_number, study_id, referring_physician_name, study_description, attrs)"
            " VALUES (%s, (SELECT pk FROM patients WHERE collection = %s AND patient_id = %s),"
            " %s, %s, %s, %s, %s, %s, %s, %s::jsonb)"
            " ON CONFLICT (study_uid) DO UPDATE SET patient_pk = EXCLUDED.patient_pk,"
            " study_date = EXCLUDED.study_date, study_time = EXCLUDED.study_time,"
            " accession_number = EXCLUDED.accession_number, study_id = EXCLUDED.study_id,"
            " referring_physician_name = EXCLUDED.referring_physician_name,"
            " study_description = EXCLUDED.study_description, attrs = EXCLUDED.attrs,"
            " updated_at = now()",
            [
                (
                    uid,
                    r.collection,
                    r.patient["patient_id"],
                    r.collection,
                    r.study["study_date"],
                    r.study["study_time"],
                    r.study["accession_number"],
                    r.study["study_id"],
                    r.study["referring_physician_name"],
                    r.study["study_description"],
                    r.study_attrs,
                )
                for uid, r in sorted(studies.items())
            ],
        )
        cur.executemany(
            "INSERT INTO series (series_uid, study_uid, modality, series_number,"
            " series_description, pps_start_date, pps_start_time, state, attrs)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)"
            " ON CONFLICT (series_uid) DO UPDATE SET modality = EXCLUDED.modality,"
            " series_number = EXCLUDED.series_number,"
            " series_description = EXCLUDED.series_description,"
            " pps_start_date = EXCLUDED.pps_start_date,"
            " pps_start_time = EXCLUDED.pps_start_time, attrs = EXCLUDED.attrs,"
            " state = EXCLUDED.state, decided_at = NULL, updated_at = now()",
            [
                (
                    uid,
                    r.study_uid,
                    r.series["modality"],
                    r.series["series_number"],
                    r.series["series_description"],
                    r.series["pps_start_date"],
                    r.series["pps_start_time"],
                    INCOMING,
                    r.series_attrs,
                )
                for uid, r in sorted(series.items())
            ],
        )
        cur.executemany(
            "INSERT INTO instances (sop_uid, series_uid, study_uid, sop_class_uid,"
            " instance_number, transfer_syntax_uid, object_key, size, sha256, metadata,"
            " intake_findings) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb)"
            " ON CONFLICT (sop_uid) DO UPDATE SET series_uid = EXCLUDED.series_uid,"
            " study_uid = EXCLUDED.study_uid, sop_class_uid = EXCLUDED.sop_class_uid,"
            " instance_number = EXCLUDED.instance_number,"
            " transfer_syntax_uid = EXCLUDED.transfer_syntax_uid,"
            " object_key = EXCLUDED.object_key, size = EXCLUDED.size, sha256 = EXCLUDED.sha256,"
            " metadata = EXCLUDED.metadata, intake_findings = EXCLUDED.intake_findings,"
            " updated_at = now()",
            [
                (
                    r.sop_uid,
                    r.series_uid,
                    r.study_uid,
                    r.sop_class_uid,
                    r.instance_number,
                    r.transfer_syntax_uid,
                    r.object_key,
                    r.size,
                    r.sha256,
                    r.metadata,
                    r.intake_findings,
                )
                for r in by_sop.values()
            ],
        )
        originals.record(cur, records)
        jobs.schedule(cur, series, settle_after)


# The columns of series and studies taken from an IndexRecord's series and study dicts.
_SERIES_COLUMNS = (
    "modality",
    "series_number",
    "series_description",
    "pps_start_date",
    "pps_start_time",
)
_STUDY_COLUMNS = (
    "study_date",
    "study_time",
    "accession_number",
    "study_id",
    "referring_physician_name",
    "study_description",
)


def _assignments(columns: Sequence[str]) -> str:
    return ", ".join(f"{c} = %s" for c in columns)


def rewrite_instances(conn: Connection, rewritten: Sequence[tuple[IndexRecord, str]]) -> None:
    """Point the index at rewritten objects (record, object key) of instances it holds (a
    curator's redaction or edit), in conn's transaction: each instance's object, size,
    checksum and metadata, and the patient, study and series attributes the objects now carry.
    Unlike write_batch, no state changes and nothing is scheduled: the series stays where the
    curator has it."""
    with conn.cursor() as cur:
        cur.executemany(
            "UPDATE instances SET transfer_syntax_uid = %s, object_key = %s, size = %s,"
            " sha256 = %s, metadata = %s::jsonb, updated_at = now() WHERE sop_uid = %s",
            [
                (r.transfer_syntax_uid, key, r.size, r.sha256, r.metadata, r.sop_uid)
                for r, key in rewritten
            ],
        )
        records = [r for r, _ in rewritten]
        for r in {r.series_uid: r for r in records}.values():
            cur.execute(
                f"UPDATE series SET {_assignments(_SERIES_COLUMNS)}, attrs = %s::jsonb,"
                " updated_at = now() WHERE series_uid = %s",
                [*(r.series[c] for c in _SERIES_COLUMNS), r.series_attrs, r.series_uid],
            )
        for r in {r.study_uid: r for r in records}.values():
            cur.execute(
                f"UPDATE studies SET {_assignments(_STUDY_COLUMNS)}, attrs = %s::jsonb,"
                " updated_at = now() WHERE study_uid = %s",
                [*(r.study[c] for c in _STUDY_COLUMNS), r.study_attrs, r.study_uid],
            )
            # The patient's key (collection, PatientID) stays: de-identification decides it.
            cur.execute(
                "UPDATE patients p SET sex = %s, attrs = %s::jsonb FROM studies st"
                " WHERE st.study_uid = %s AND p.pk = st.patient_pk",
                (r.patient["sex"], r.patient_attrs, r.study_uid),
            )


def _scope(
    study: str, series: str | None, sop: str | None, scope: Scope
) -> tuple[str, list[object]]:
    where = ["i.study_uid = %s", "se.state = %s"]
    params: list[object] = [study, PUBLISHED]
    if scope.collections is not None:
        where.append(
            "EXISTS (SELECT 1 FROM studies st WHERE st.study_uid = i.study_uid"
            " AND st.collection = ANY(%s))"
        )
        params.append(list(scope.collections))
    if scope.share is not None:
        member, member_args = scope.member("i.sop_uid")
        where.append(member)
        params += member_args
    if series is not None:
        where.append("i.series_uid = %s")
        params.append(series)
    if sop is not None:
        where.append("i.sop_uid = %s")
        params.append(sop)
    return " AND ".join(where), params


def instance_objects(
    pool: ConnectionPool,
    study: str,
    series: str | None = None,
    sop: str | None = None,
    scope: Scope = EVERYTHING,
) -> list[tuple[str, str, int]]:
    """(object key, transfer syntax, size) of the published instances in scope, in order."""
    where, params = _scope(study, series, sop, scope)
    with db.one_statement(pool) as conn:
        rows = conn.execute(
            "SELECT i.object_key, i.transfer_syntax_uid, i.size FROM instances i"
            " JOIN series se ON se.series_uid = i.series_uid"
            f" WHERE {where} ORDER BY se.series_number NULLS LAST, i.series_uid,"
            " i.instance_number NULLS LAST, i.sop_uid",
            params,
        ).fetchall()
    if not rows:
        raise NotFound("no published instance matches")
    return [(r[0], r[1], r[2]) for r in rows]


# The image pixel module attributes that place native frames (PS3.3 C.7.6.3), as kept in
# the metadata: Rows, Columns, Samples per Pixel, Bits Allocated, Number of Frames.
GEOMETRY_TAGS = ("00280010", "00280011", "00280002", "00280100", "00280008")


def instance_object(
    pool: ConnectionPool,
    study: str,
    series: str,
    sop: str,
    scope: Scope = EVERYTHING,
    access: audit.Access | None = None,
) -> InstanceObject:
    """(object key, transfer syntax, size, Version, geometry) of one published instance, in
    one query (a frame or bulk data request needs them all), geometry being the values of
    GEOMETRY_TAGS as text (None where absent); NotFound if it is not in scope. With access,
    the same statement audits the read of its study (one round trip, one commit)."""
    query, params = _instance_object_query(study, series, sop, scope, access)
    with db.one_statement(pool) as conn:
        return _instance_object(conn.execute(query, params).fetchone())


async def instance_object_async(
    pool: AsyncConnectionPool,
    study: str,
    series: str,
    sop: str,
    scope: Scope = EVERYTHING,
    access: audit.Access | None = None,
) -> InstanceObject:
    """instance_object on a pool of db.open_statement_pool, from the event loop."""
    query, params = _instance_object_query(study, series, sop, scope, access)
    async with pool.connection() as conn:
        cursor = await conn.execute(query, params)
        return _instance_object(await cursor.fetchone())


def _instance_object_query(
    study: str, series: str, sop: str, scope: Scope, access: audit.Access | None
) -> tuple[str, list[object]]:
    where, params = _scope(study, series, sop, scope)
    geometry = "".join(f", i.metadata->'{t}'->'Value'->>0" for t in GEOMETRY_TAGS)
    found = (
        "SELECT i.object_key, i.transfer_syntax_uid, i.size,"
        " md5(i.sop_uid || ':' || i.sha256), greatest(i.updated_at, se.updated_at),"
        f" i.study_uid{geometry}"
        f" FROM instances i JOIN series se ON se.series_uid = i.series_uid WHERE {where}"
    )
    if access is not None:
        logged, logged_params = audit.insert(access, "s.study_uid IN (SELECT study_uid FROM hit)")
        found = f"WITH hit AS ({found}), logged AS ({logged}) SELECT * FROM hit"
        params = [*params, *logged_params]
    return found, params


def _instance_object(row: tuple | None) -> InstanceObject:
    if row is None:
        raise NotFound("no published instance matches")
    # The digest is what version() computes for a single instance.
    return row[0], row[1], row[2], Version(row[3], row[4]), tuple(row[6:])


@dataclass(frozen=True)
class Version:
    """What identifies the current content of a set of published instances: a digest of
    their SOP Instance UIDs and content hashes, and when any of them last changed."""

    digest: str
    modified: datetime


# (object key, transfer syntax, size, Version, geometry): what instance_object finds.
InstanceObject = tuple[str, str, int, Version, tuple[str | None, ...]]


def version(
    pool: ConnectionPool,
    study: str,
    series: str | None = None,
    sop: str | None = None,
    scope: Scope = EVERYTHING,
) -> Version:
    """The Version of the published instances in scope; NotFound if there are none."""
    where, params = _scope(study, series, sop, scope)
    with db.one_statement(pool) as conn:
        digest, modified = conn.execute(
            "SELECT md5(string_agg(i.sop_uid || ':' || i.sha256, ',' ORDER BY i.sop_uid)),"
            " max(greatest(i.updated_at, se.updated_at))"
            " FROM instances i JOIN series se ON se.series_uid = i.series_uid"
            f" WHERE {where}",
            params,
        ).fetchone()  # type: ignore[misc]
    if digest is None:
        raise NotFound("no published instance matches")
    return Version(digest, modified)


def first_series(pool: ConnectionPool, study: str, scope: Scope = EVERYTHING) -> str:
    """The Series Instance UID of a study's first published series (in scope), in series
    number order."""
    where, params = _scope(study, None, None, scope)
    with db.one_statement(pool) as conn:
        row = conn.execute(
            "SELECT i.series_uid FROM instances i JOIN series se ON se.series_uid = i.series_uid"
            f" WHERE {where} ORDER BY se.series_number NULLS LAST, i.series_uid LIMIT 1",
            params,
        ).fetchone()
    if row is None:
        raise NotFound("no published instance matches")
    return row[0]  # type: ignore[no-any-return]


def iter_metadata(
    pool: ConnectionPool,
    study: str,
    series: str | None = None,
    sop: str | None = None,
    batch: int = 500,
    scope: Scope = EVERYTHING,
) -> Iterator[str]:
    """Each published instance's DICOM JSON metadata as text (in scope), streamed from
    PostgreSQL."""
    where, params = _scope(study, series, sop, scope)
    with pool.connection() as conn:
        exists = conn.execute(
            "SELECT 1 FROM instances i JOIN series se ON se.series_uid = i.series_uid"
            f" WHERE {where} LIMIT 1",
            params,
        ).fetchone()
    if exists is None:
        raise NotFound("no published instance matches")
    return _stream_metadata(pool, where, params, batch)


def _stream_metadata(
    pool: ConnectionPool, where: str, params: list[object], batch: int
) -> Iterator[str]:
    with pool.connection() as conn, conn.transaction(), conn.cursor(name="metadata") as cur:
        cur.itersize = batch
        cur.execute(
            "SELECT i.metadata::text FROM instances i"
            " JOIN series se ON se.series_uid = i.series_uid"
            f" WHERE {where} ORDER BY se.series_number NULLS LAST, i.series_uid,"
            " i.instance_number NULLS LAST, i.sop_uid",
            params,
        )
        for (text,) in cur:
            yield text


def analyze(pool: ConnectionPool) -> None:
    """Refresh the planner's statistics of the index tables."""
    with pool.connection() as conn:
        conn.execute("ANALYZE patients, studies, series, instances")


@dataclass(frozen=True)
class RetrievableInstance:
    """A published instance a peer may retrieve: what a C-STORE sub-operation needs of it."""

    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    object_key: str
    size: int


def collection_studies(
    pool: ConnectionPool, collection: str, within: Sequence[str] | None = None
) -> list[str]:
    """Study Instance UIDs of a collection's published studies; only those in within, if given."""
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT s.study_uid FROM studies s WHERE s.collection = %(c)s"
            " AND (%(within)s::text[] IS NULL OR s.study_uid = ANY(%(within)s))"
            " AND EXISTS (SELECT 1 FROM series x WHERE x.study_uid = s.study_uid"
            " AND x.state = %(published)s) ORDER BY s.study_uid",
            {
                "c": collection,
                "within": list(within) if within is not None else None,
                "published": PUBLISHED,
            },
        ).fetchall()
    return [r[0] for r in rows]


def retrievable_instances(
    pool: ConnectionPool,
    collection: str,
    studies: Sequence[str],
    series: Sequence[str] | None = None,
    sops: Sequence[str] | None = None,
) -> list[RetrievableInstance]:
    """The published instances of a collection in the given studies (and series, and SOP
    Instance UIDs, when given), in study, series and instance order."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(RetrievableInstance)) as cur:
        cur.execute(
            "SELECT i.sop_uid, i.sop_class_uid, i.transfer_syntax_uid, i.object_key, i.size"
            " FROM instances i JOIN series se ON se.series_uid = i.series_uid"
            " JOIN studies s ON s.study_uid = i.study_uid"
            " WHERE s.collection = %(c)s AND se.state = %(published)s"
            " AND i.study_uid = ANY(%(studies)s)"
            " AND (%(series)s::text[] IS NULL OR i.series_uid = ANY(%(series)s))"
            " AND (%(sops)s::text[] IS NULL OR i.sop_uid = ANY(%(sops)s))"
            " ORDER BY i.study_uid, se.series_number NULLS LAST, i.series_uid,"
            " i.instance_number NULLS LAST, i.sop_uid",
            {
                "c": collection,
                "published": PUBLISHED,
                "studies": list(studies),
                "series": list(series) if series is not None else None,
                "sops": list(sops) if sops is not None else None,
            },
        )
        return cur.fetchall()


def held_uids(conninfo: str, collection: str, uids: Sequence[str]) -> set[str]:
    """The UIDs among uids that Carina itself wrote in collection: those of a study, series or
    instance it holds, and the frame of reference of a held series among them."""
    with psycopg.connect(conninfo) as conn:
        found = {
            row[0]
            for row in conn.execute(
                "SELECT s.study_uid FROM studies s"
                " WHERE s.collection = %(c)s AND s.study_uid = ANY(%(u)s)"
                " UNION SELECT se.series_uid FROM series se JOIN studies s USING (study_uid)"
                " WHERE s.collection = %(c)s AND se.series_uid = ANY(%(u)s)"
                " UNION SELECT i.sop_uid FROM instances i JOIN studies s USING (study_uid)"
                " WHERE s.collection = %(c)s AND i.sop_uid = ANY(%(u)s)",
                {"c": collection, "u": list(uids)},
            )
        }
        if found:
            found |= {
                row[0]
                for row in conn.execute(
                    "SELECT DISTINCT i.metadata->'00200052'->'Value'->>0 FROM instances i"
                    " WHERE i.series_uid = ANY(%s) OR i.sop_uid = ANY(%s)",
                    (list(found), list(found)),
                )
                if row[0] in uids
            }
    return found


def study_attributes(conninfo: str, study_uid: str) -> dict[str, Any]:
    """The patient and study attributes (DICOM JSON) of a held study, as its instances hold
    them (de-identified)."""
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(
            "SELECT metadata FROM instances WHERE study_uid = %s LIMIT 1", (study_uid,)
        ).fetchone()
    metadata = row[0] if row else {}
    return {tag: metadata[tag] for tag in sorted(PATIENT_TAGS | STUDY_TAGS) if tag in metadata}
