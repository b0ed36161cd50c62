"""Series selection by QC figures, as IDC selects series: the geometry the curation rules
compute per series (table series_qc: slice count, slice thickness, spacing, localizer, tilt)
queried together with modality and collection, over published series only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool


@dataclass(frozen=True)
class SeriesQuery:
    """Filters of a series selection; None matches anything. Ranges are inclusive: a series
    matches a thickness range when every slice's thickness lies in it."""

    modality: str | None = None
    collection: str | None = None
    study_uid: str | None = None
    slices_min: int | None = None
    slices_max: int | None = None
    thickness_min: float | None = None
    thickness_max: float | None = None
    spacing_uniform: bool | None = None
    localizer: bool | None = None
    tilted: bool | None = None
    #: the collections searched (None: all); callers pass those the requester may read
    readable: tuple[str, ...] | None = None
    limit: int = 100
    offset: int = 0


# The figures answered per series (series_qc columns), after its identity.
FIGURES = (
    "instance_count",
    "slice_count",
    "slice_thickness_min",
    "slice_thickness_max",
    "spacing_min",
    "spacing_max",
    "spacing_mean",
    "spacing_uniform",
    "missing_slices",
    "has_localizer",
    "localizer_count",
    "tilted",
    "tilt_degrees",
)


def search_series(pool: ConnectionPool, q: SeriesQuery) -> list[dict[str, Any]]:
    """Published series matching q with their QC figures, ordered by series UID."""
    sql, params = series_sql(q)
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql, params)  # type: ignore[arg-type]
        return cur.fetchall()


def series_sql(q: SeriesQuery) -> tuple[str, list[Any]]:
    """The SQL and parameters of a series selection."""
    where = ["se.state = 'published'"]
    params: list[Any] = []
    for condition, value in (
        ("se.modality = %s", q.modality),
        ("st.collection = %s", q.collection),
        ("se.study_uid = %s", q.study_uid),
        ("st.collection = ANY(%s)", None if q.readable is None else list(q.readable)),
        ("qc.slice_count >= %s", q.slices_min),
        ("qc.slice_count <= %s", q.slices_max),
        ("qc.slice_thickness_min >= %s", q.thickness_min),
        ("qc.slice_thickness_max <= %s", q.thickness_max),
        ("qc.spacing_uniform = %s", q.spacing_uniform),
        ("qc.has_localizer = %s", q.localizer),
        ("qc.tilted = %s", q.tilted),
    ):
        if value is not None:
            where.append(condition)
            params.append(value)
    sql = (
        "SELECT se.series_uid, se.study_uid, st.collection, se.modality, se.series_number,"
        f" {', '.join(f'qc.{c}' for c in FIGURES)}"
        " FROM series se JOIN series_qc qc ON qc.series_uid = se.series_uid"
        " JOIN studies st ON st.study_uid = se.study_uid"
        f" WHERE {' AND '.join(where)} ORDER BY se.series_uid LIMIT %s OFFSET %s"
    )
    return sql, [*params, q.limit, q.offset]
