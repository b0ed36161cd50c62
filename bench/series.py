"""Series selection at scale: N series with generated QC figures INSERTed into a fresh embedded
PostgreSQL (one study each, four collections, five modalities, 90% published), then typical
selections through archive/qc.py (GET /api/series), timed and EXPLAINed."""

from __future__ import annotations

import argparse
import sys
import time

import psycopg
from _timing import embedded_database, print_plans, print_timings

from carina.archive import qc
from carina.archive.qc import SeriesQuery

COLLECTIONS = ["lung-ct", "liver-mr", "brain-mr", "prostate-mr"]

# Everything generated server side from generate_series: the figures are spread so that the
# issue's example ("CT, > 100 slices, 1.5-2.5 mm, uniform") keeps a few percent of the rows.
POPULATE = """
INSERT INTO patients (pk, collection, patient_id)
    SELECT g, (%(collections)s::text[])[1 + g %% 4], 'P' || g FROM generate_series(1, %(n)s) g;
INSERT INTO studies (study_uid, patient_pk, collection)
    SELECT '2.25.1' || g, g, (%(collections)s::text[])[1 + g %% 4]
    FROM generate_series(1, %(n)s) g;
INSERT INTO series (series_uid, study_uid, modality, series_number, state)
    SELECT '2.25.2' || g, '2.25.1' || g, (ARRAY['CT', 'MR', 'PT', 'CR', 'SEG'])[1 + g %% 5], 1,
           CASE WHEN g %% 11 = 0 THEN 'quarantined' ELSE 'published' END
    FROM generate_series(1, %(n)s) g;
INSERT INTO series_qc (series_uid, instance_count, frame_count, slice_count, has_geometry,
        multiframe, localizer_count, has_localizer, orientation_consistent,
        orientation_deviation, pixel_spacing_consistent, dimensions_consistent,
        positions_unique, duplicate_positions, slice_thickness_min, slice_thickness_max,
        spacing_min, spacing_max, spacing_mean, spacing_uniform, missing_slices, tilt_degrees,
        tilted)
    SELECT '2.25.2' || g, s, s, s, true, false, l, l > 0, true, 0, true, true, true, 0,
           t, t, t, t, t, g %% 7 <> 0, 0, CASE WHEN g %% 13 = 0 THEN 15.0 ELSE 0.0 END,
           g %% 13 = 0
    FROM generate_series(1, %(n)s) g,
         LATERAL (SELECT 1 + (g::bigint * 7919) %% 600 AS s,
                         (ARRAY[0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0])[1 + g %% 7] AS t,
                         CASE WHEN g %% 17 = 0 THEN 1 ELSE 0 END AS l) x;
VACUUM ANALYZE patients, studies, series, series_qc;
"""


def populate(url: str, n: int) -> None:
    """The collections and n series with their QC figures."""
    with psycopg.connect(url, autocommit=True) as conn:
        for name in COLLECTIONS:
            conn.execute("INSERT INTO collections (name) VALUES (%s)", (name,))
        for statement in filter(str.strip, POPULATE.split(";")):
            conn.execute(statement, {"collections": COLLECTIONS, "n": n})  # type: ignore[arg-type]


QUERIES = [
    (
        "CT, >100 slices, 1.5-2.5 mm, uniform",
        SeriesQuery(
            modality="CT",
            slices_min=101,
            thickness_min=1.5,
            thickness_max=2.5,
            spacing_uniform=True,
        ),
    ),
    ("same, readable lung-ct only", None),
    ("tilted MR, offset 1000", SeriesQuery(modality="MR", tilted=True, offset=1000)),
    ("with a localizer, 1-50 slices", SeriesQuery(localizer=True, slices_min=1, slices_max=50)),
    ("everything, limit 10000", SeriesQuery(limit=10000)),
]


def main() -> int:
    """Populate, time and explain; print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--series", type=int, default=1_000_000, help="series rows")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per query")
    parser.add_argument("--no-explain", action="store_true")
    args = parser.parse_args()
    first = QUERIES[0][1]
    assert first is not None
    queries = [
        (name, q or SeriesQuery(**{**vars(first), "readable": ("lung-ct",)})) for name, q in QUERIES
    ]

    with embedded_database("carina-bench-series-") as url:
        t = time.perf_counter()
        populate(url, args.series)
        print(
            f"{args.series:,} series with QC figures; INSERT + VACUUM ANALYZE: "
            f"{time.perf_counter() - t:.1f} s\n"
        )
        print_timings(url, qc.search_series, queries, args.runs, width=40)
        print("\n(Orthanc keeps no per-series geometry figures: no peer column.)")
        if not args.no_explain:
            print_plans(url, qc.series_sql, queries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
