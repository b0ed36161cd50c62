"""The series queue: series waiting for the series rules, as rows of series_jobs (006).

A worker takes one due row with ``SELECT ... FOR UPDATE SKIP LOCKED`` and deletes it in the
transaction that decides the series. A worker that dies mid-job rolls back, which unlocks the
row, and the next worker takes it: no lease or heartbeat of our own. NOTIFY on CHANNEL wakes
idle workers when something becomes due at once."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from psycopg import Connection, Cursor
from psycopg_pool import ConnectionPool

CHANNEL = "carina_series_jobs"
# A failed evaluation is retried after RETRY_BASE * 2**attempts seconds, at most RETRY_MAX.
RETRY_BASE = 2.0
RETRY_MAX = 300.0


def schedule(cur: Cursor, series_uids: Iterable[str], delay: float) -> None:
    """(Re)schedule each series to be evaluated delay seconds from now: every arrival pushes
    the quiet period back. In the caller's transaction, so the job exists iff the instances do."""
    uids = sorted(set(series_uids))
    if not uids:
        return
    cur.execute(
        "INSERT INTO series_jobs (series_uid, due_at)"
        " SELECT u, now() + make_interval(secs => %s) FROM unnest(%s::text[]) u"
        " ON CONFLICT (series_uid) DO UPDATE SET due_at = EXCLUDED.due_at, attempts = 0,"
        " last_error = NULL",
        (delay, uids),
    )
    if delay <= 0:
        cur.execute("SELECT pg_notify(%s, '')", (CHANNEL,))


def settle(pool: ConnectionPool, series_uids: Iterable[str]) -> int:
    """Make the jobs of these series due now (their request or association ended); the count."""
    uids = sorted(set(series_uids))
    if not uids:
        return 0
    with pool.connection() as conn:
        cur = conn.execute(
            "UPDATE series_jobs SET due_at = now() WHERE series_uid = ANY(%s) AND due_at > now()",
            (uids,),
        )
        conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
        return cur.rowcount


def claim(conn: Connection, skip: Sequence[str] = ()) -> tuple[str, int] | None:
    """(series UID, attempts so far) of one due job, locked with its series row for the rest of
    conn's transaction; None when nothing is due or every due one is taken. Both rows are taken
    with SKIP LOCKED, so a worker never waits on an intake writing that series (it is
    rescheduled by that write anyway). Series in skip (a worker is reading their frames before
    it decides them, curation/lifecycle.py) are left to it."""
    row = conn.execute(
        "SELECT j.series_uid, j.attempts FROM series_jobs j"
        " JOIN series s ON s.series_uid = j.series_uid"
        " WHERE j.due_at <= now() AND j.series_uid <> ALL(%s) ORDER BY j.due_at LIMIT 1"
        # The series row NO KEY UPDATE: the decision changes its state only, and rows that
        # merely reference the series (a submission's links) need not wait for it.
        " FOR UPDATE OF j SKIP LOCKED FOR NO KEY UPDATE OF s SKIP LOCKED",
        (list(skip),),
    ).fetchone()
    return (row[0], row[1]) if row else None


def finish(conn: Connection, series_uid: str) -> None:
    """Remove a job once its series is decided (in the deciding transaction)."""
    conn.execute("DELETE FROM series_jobs WHERE series_uid = %s", (series_uid,))


def retry_later(pool: ConnectionPool, series_uid: str, error: str) -> int:
    """Count a failed attempt and push the job back (exponential backoff); the attempts now."""
    with pool.connection() as conn:
        row = conn.execute(
            "UPDATE series_jobs SET attempts = attempts + 1, last_error = %s,"
            " due_at = now() + make_interval(secs => least(%s * 2 ^ attempts, %s))"
            " WHERE series_uid = %s RETURNING attempts",
            (error, RETRY_BASE, RETRY_MAX, series_uid),
        ).fetchone()
    return row[0] if row else 0


def seconds_to_next(conn: Connection) -> float | None:
    """Seconds until the earliest job is due (0 if one is due now); None with no job at all."""
    # Not greatest(..., 0) in SQL: GREATEST ignores NULL, so an empty queue would read as a
    # job due now, and idle workers would look again every few milliseconds.
    row = conn.execute(
        "SELECT extract(epoch FROM min(due_at) - clock_timestamp()) FROM series_jobs"
    ).fetchone()
    return max(float(row[0]), 0.0) if row and row[0] is not None else None
