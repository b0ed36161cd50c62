"""The curator's side of the lifecycle: the queue of held series, one series' findings and
figures, and the decisions (release, reject, reprocess).

Each decision locks the series row, checks that it applies to the series' present state, and
is recorded in audit_log in the same transaction, so two curators (or a curator and a worker)
cannot decide one series at once and no decision goes unrecorded."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from carina.archive import jobs, originals
from carina.archive.storage import ObjectStore

from . import audit
from .errors import DecisionRefused, UnknownSeries
from .lifecycle import INCOMING, PUBLISHED, QUARANTINED, REJECTED

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueFilter:
    """Which series the queue lists: by state, collection, rule or finding code, and age
    (seconds since the series was decided)."""

    state: str = QUARANTINED
    collection: str | None = None
    # The collections the curator may see (None: every one); the others are never listed.
    curated: tuple[str, ...] | None = None
    rule: str | None = None  # a rule name (geometry) or a finding code (geometry-tilt)
    min_age: float | None = None
    max_age: float | None = None
    limit: int = 100
    offset: int = 0
    # who submitted the series: an AE title (C-STORE) or a token's name (STOW-RS)
    submitter: str | None = None


def queue(pool: ConnectionPool, f: QueueFilter) -> list[dict[str, Any]]:
    """Series matching the filter, oldest decision first, each with its hold findings and
    who submitted it."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT se.series_uid, se.study_uid, st.collection, se.modality, se.state,"
            " se.decided_at, extract(epoch FROM now() - se.decided_at)::float AS age_seconds,"
            " (SELECT count(*) FROM instances i WHERE i.series_uid = se.series_uid)"
            "   AS instances,"
            " coalesce((SELECT jsonb_agg(jsonb_build_object('rule', x.rule, 'code', x.code,"
            "   'severity', x.severity, 'message', x.message) ORDER BY x.pk)"
            "   FROM series_findings x WHERE x.series_uid = se.series_uid), '[]') AS findings,"
            " coalesce((SELECT jsonb_agg(DISTINCT sb.submitter) FROM submission_series ss"
            "   JOIN submissions sb ON sb.id = ss.submission_id"
            "   WHERE ss.series_uid = se.series_uid), '[]') AS submitters"
            " FROM series se JOIN studies st ON st.study_uid = se.study_uid"
            " WHERE se.state = %(state)s"
            " AND (%(collection)s::text IS NULL OR st.collection = %(collection)s)"
            " AND (%(curated)s::text[] IS NULL OR st.collection = ANY(%(curated)s))"
            " AND (%(rule)s::text IS NULL OR EXISTS (SELECT 1 FROM series_findings x"
            "   WHERE x.series_uid = se.series_uid AND x.severity = 'hold'"
            "   AND (x.rule = %(rule)s OR x.code = %(rule)s)))"
            " AND (%(submitter)s::text IS NULL OR EXISTS (SELECT 1 FROM submission_series ss"
            "   JOIN submissions sb ON sb.id = ss.submission_id"
            "   WHERE ss.series_uid = se.series_uid AND sb.submitter = %(submitter)s))"
            " AND (%(min_age)s::float IS NULL"
            "   OR se.decided_at <= now() - make_interval(secs => %(min_age)s))"
            " AND (%(max_age)s::float IS NULL"
            "   OR se.decided_at >= now() - make_interval(secs => %(max_age)s))"
            " ORDER BY se.decided_at NULLS LAST, se.series_uid LIMIT %(limit)s OFFSET %(offset)s",
            {
                "state": f.state,
                "collection": f.collection,
                "curated": None if f.curated is None else list(f.curated),
                "rule": f.rule,
                "submitter": f.submitter,
                "min_age": f.min_age,
                "max_age": f.max_age,
                "limit": f.limit,
                "offset": f.offset,
            },
        )
        return cur.fetchall()


def series_view(pool: ConnectionPool, series_uid: str) -> dict[str, Any]:
    """A series' state, findings, QC figures and audit trail (UnknownSeries if none)."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT se.series_uid, se.study_uid, st.collection, se.modality, se.state,"
            " se.decided_at, (SELECT count(*) FROM instances i"
            "   WHERE i.series_uid = se.series_uid) AS instances"
            " FROM series se JOIN studies st ON st.study_uid = se.study_uid"
            " WHERE se.series_uid = %s",
            (series_uid,),
        )
        view = cur.fetchone()
        if view is None:
            raise UnknownSeries(f"no series {series_uid}")
        cur.execute(
            "SELECT rule, code, severity, message, details FROM series_findings"
            " WHERE series_uid = %s ORDER BY pk",
            (series_uid,),
        )
        view["findings"] = cur.fetchall()
        cur.execute("SELECT * FROM series_qc WHERE series_uid = %s", (series_uid,))
        qc = cur.fetchone()
        if qc is not None:
            qc.pop("series_uid")
        view["qc"] = qc
    view["audit"] = [
        {k: v for k, v in vars(e).items() if k not in ("series_uid", "collection")}
        for e in audit.entries(pool, series_uid)
    ]
    return view


@dataclass(frozen=True)
class HeldInstance:
    """One instance of a series as the curator sees it: its de-identified UIDs, where its
    object is stored, and how many frames it has."""

    sop_uid: str
    study_uid: str
    instance_number: int | None
    object_key: str
    frames: int


def series_instances(pool: ConnectionPool, series_uid: str) -> list[HeldInstance]:
    """The instances of a series in any state, in instance number order (empty when none)."""
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT sop_uid, study_uid, instance_number, object_key,"
            " coalesce((metadata #>> '{00280008,Value,0}')::int, 1)"
            " FROM instances WHERE series_uid = %s"
            " ORDER BY instance_number NULLS LAST, sop_uid",
            (series_uid,),
        ).fetchall()
    return [HeldInstance(*r) for r in rows]


def instance_metadata(pool: ConnectionPool, series_uid: str, sop_uid: str) -> dict[str, Any]:
    """The de-identified DICOM JSON metadata of one instance of a series (UnknownSeries if the
    series holds no such instance)."""
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT metadata FROM instances WHERE series_uid = %s AND sop_uid = %s",
            (series_uid, sop_uid),
        ).fetchone()
    if row is None:
        raise UnknownSeries(f"no instance {sop_uid} in series {series_uid}")
    return row[0]  # type: ignore[no-any-return]


def collection_of(pool: ConnectionPool, series_uid: str) -> str:
    """The collection a series belongs to (UnknownSeries when none is held)."""
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT st.collection FROM series se JOIN studies st ON st.study_uid = se.study_uid"
            " WHERE se.series_uid = %s",
            (series_uid,),
        ).fetchone()
    if row is None:
        raise UnknownSeries(f"no series {series_uid}")
    return str(row[0])


def lock_series(conn: Connection, series_uid: str) -> tuple[str, str]:
    """(state, collection) of the series, its row locked until the transaction ends."""
    row = conn.execute(
        "SELECT se.state, st.collection FROM series se"
        " JOIN studies st ON st.study_uid = se.study_uid"
        " WHERE se.series_uid = %s FOR UPDATE OF se",
        (series_uid,),
    ).fetchone()
    if row is None:
        raise UnknownSeries(f"no series {series_uid}")
    return row[0], row[1]


def require_state(state: str, allowed: tuple[str, ...], decision: str) -> None:
    if state not in allowed:
        raise DecisionRefused(
            f"cannot {decision} a series that is {state}; only a series that is "
            + " or ".join(allowed)
        )


def _decided_at(conn: Connection, series_uid: str, state: str) -> datetime:
    row = conn.execute(
        "UPDATE series SET state = %s, decided_at = now(), updated_at = now()"
        " WHERE series_uid = %s RETURNING decided_at",
        (state, series_uid),
    ).fetchone()
    assert row is not None
    return row[0]


def release(pool: ConnectionPool, series_uid: str, actor: str, reason: str) -> None:
    """Publish a quarantined series as it is, on a curator's word."""
    with pool.connection() as conn, conn.transaction():
        state, collection = lock_series(conn, series_uid)
        require_state(state, (QUARANTINED,), "release")
        _decided_at(conn, series_uid, PUBLISHED)
        originals.release(conn, series_uid)
        audit.record(
            conn,
            actor=actor,
            action="release",
            series_uid=series_uid,
            collection=collection,
            reason=reason,
            before={"state": state},
            after={"state": PUBLISHED},
        )


def reject(
    pool: ConnectionPool, store: ObjectStore, series_uid: str, actor: str, reason: str
) -> int:
    """Delete a quarantined series' instances from the index and the store; the series row
    stays, rejected, so its findings and audit trail keep their subject. The count deleted."""
    with pool.connection() as conn, conn.transaction():
        state, collection = lock_series(conn, series_uid)
        require_state(state, (QUARANTINED,), "reject")
        keys = [
            r[0]
            for r in conn.execute(
                "DELETE FROM instances WHERE series_uid = %s RETURNING object_key", (series_uid,)
            )
        ]
        _decided_at(conn, series_uid, REJECTED)
        originals.drop(conn, [series_uid])
        audit.record(
            conn,
            actor=actor,
            action="reject",
            series_uid=series_uid,
            collection=collection,
            reason=reason,
            before={"state": state, "instances": len(keys)},
            after={"state": REJECTED, "instances": 0},
        )
    # After the commit: an object left behind by a failure here is an orphan `carina fsck`
    # finds, never an index row without its object.
    for key in keys:
        try:
            store.delete(key)
        except Exception as e:
            log.error(
                "rejected object not deleted (carina fsck --repair will): %s", type(e).__name__
            )
    return len(keys)


REPROCESSABLE = (QUARANTINED, PUBLISHED)


def reprocess(
    pool: ConnectionPool,
    series_uid: str,
    actor: str,
    reason: str,
    *,
    deid: dict[str, Any] | None = None,
    delay: float = 0.0,
) -> None:
    """Send a decided series through the rules again (e.g. after its collection's settings
    changed); it is incoming, and so hidden, until evaluated delay seconds from now. deid:
    the profile and options its originals are being de-identified with again (audited)."""
    with pool.connection() as conn, conn.transaction():
        state, collection = lock_series(conn, series_uid)
        require_state(state, REPROCESSABLE, "reprocess")
        conn.execute(
            "UPDATE series SET state = %s, decided_at = NULL, updated_at = now()"
            " WHERE series_uid = %s",
            (INCOMING, series_uid),
        )
        originals.hold(conn, series_uid)
        with conn.cursor() as cur:
            jobs.schedule(cur, [series_uid], delay)
        audit.record(
            conn,
            actor=actor,
            action="reprocess",
            series_uid=series_uid,
            collection=collection,
            reason=reason,
            before={"state": state},
            after={"state": INCOMING, **({"deid": deid} if deid else {})},
        )
