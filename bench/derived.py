"""Measurement search at scale: N TID 1500 measurement rows COPYed into a fresh embedded
PostgreSQL, then three typical searches through archive/derived.py, timed and EXPLAINed."""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Iterator

import psycopg
from _timing import embedded_database, percentile, print_plans, print_timings

from carina.api import export
from carina.api.derived import MEASUREMENT_COLUMNS
from carina.archive import db, derived
from carina.archive.derived import Code, MeasurementQuery

COLLECTIONS = ["lung-ct", "liver-mr", "brain-mr", "prostate-mr"]
# (SCT code, meaning, UCUM unit, typical value): the measurements of a lesion's group.
CONCEPTS = [
    ("118565006", "Volume", "mm3", 2000.0),
    ("103339001", "Long Axis", "mm", 20.0),
    ("103340004", "Short Axis", "mm", 12.0),
    ("131190003", "Diameter", "mm", 15.0),
    ("42798000", "Area", "mm2", 150.0),
    ("373098007", "Mean", "[hnsf'U]", 40.0),
    ("386136009", "Standard Deviation", "[hnsf'U]", 10.0),
    ("56851009", "Maximum", "[hnsf'U]", 120.0),
    ("255605001", "Minimum", "[hnsf'U]", -50.0),
    ("410668003", "Length", "mm", 25.0),
]
# Finding sites (SCT codes of anatomic structures).
SITES = [f"{1000000 + i}" for i in range(40)]
FINDINGS = ["108369006", "4147007", "52988006", "1240601000000102"]


def _uid(prefix: str, n: int) -> str:
    return f"2.25.{prefix}{n:09d}"


def populate(url: str, rows: int, per_report: int, seed: int) -> None:
    """Collections, one patient/study/SR series/SR instance per report, and the rows."""
    rng = random.Random(seed)
    reports = rows // per_report
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        for name in COLLECTIONS:
            cur.execute(
                "INSERT INTO collections (name) VALUES (%s) ON CONFLICT DO NOTHING", (name,)
            )
        with cur.copy("COPY patients (pk, collection, patient_id) FROM STDIN") as copy:
            for r in range(reports):
                copy.write_row((r + 1, COLLECTIONS[r % 4], f"P{r:07d}"))
        with cur.copy("COPY studies (study_uid, patient_pk, collection) FROM STDIN") as copy:
            for r in range(reports):
                copy.write_row((_uid("1", r), r + 1, COLLECTIONS[r % 4]))
        # Published: searches answer derived objects of published series only.
        with cur.copy("COPY series (series_uid, study_uid, modality, state) FROM STDIN") as copy:
            for r in range(reports):
                copy.write_row((_uid("2", r), _uid("1", r), "CT", "published"))
                copy.write_row((_uid("3", r), _uid("1", r), "SR", "published"))
        with cur.copy(
            "COPY instances (sop_uid, series_uid, study_uid, sop_class_uid,"
            " transfer_syntax_uid, object_key, size, sha256, metadata) FROM STDIN"
        ) as copy:
            for r in range(reports):
                copy.write_row(
                    (
                        _uid("4", r),
                        _uid("3", r),
                        _uid("1", r),
                        derived.COMPREHENSIVE_3D_SR,
                        "1.2.840.10008.1.2.1",
                        f"{r}.dcm",
                        1000,
                        "0" * 64,
                        "{}",
                    )
                )
        columns = (
            "sop_uid, series_uid, study_uid, collection, group_index, group_template,"
            " tracking_id, tracking_uid, finding_value, finding_scheme, finding_meaning,"
            " finding_site_value, finding_site_scheme, finding_site_meaning,"
            " concept_value, concept_scheme, concept_meaning, value, unit_value, unit_meaning,"
            " source_series_uid"
        )
        with cur.copy(f"COPY measurements ({columns}) FROM STDIN") as copy:
            for row in _rows(rng, reports, per_report):
                copy.write_row(row)
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def _rows(rng: random.Random, reports: int, per_report: int) -> Iterator[tuple]:
    per_group = len(CONCEPTS) // 2
    for r in range(reports):
        collection = COLLECTIONS[r % 4]
        for m in range(per_report):
            group = m // per_group
            if m % per_group == 0:
                site = rng.choice(SITES)
                finding = rng.choice(FINDINGS)
                first = rng.randrange(2) * per_group  # sizes or intensities
            code, meaning, unit, typical = CONCEPTS[first + m % per_group]
            yield (
                _uid("4", r),
                _uid("3", r),
                _uid("1", r),
                collection,
                group,
                "1411",
                f"lesion {group + 1}",
                f"2.25.9{r:09d}{group:03d}",
                finding,
                "SCT",
                "Finding",
                site,
                "SCT",
                "Site",
                code,
                "SCT",
                meaning,
                typical * rng.lognormvariate(0, 0.6),
                unit,
                unit,
                _uid("2", r),
            )


def timed_export(pool: object, runs: int) -> list[tuple[str, float, float, int]]:
    """(figure, median ms, p95 ms, bytes) of a 10,000-row search written as CSV and Parquet
    (api/export.py, as /api/measurements?format= does; rows get their two DICOMweb URLs)."""
    q = MeasurementQuery(concept=Code("SCT", "118565006"), limit=derived.MAX_LIMIT)
    rows = [
        {
            **{k: v for k, v in row.items() if k not in ("pk", "referenced_study_uid")},
            "object_url": f"http://127.0.0.1:8080/dicomweb/studies/{row['study_uid']}/series/x",
            "retrieve_url": f"http://127.0.0.1:8080/dicomweb/studies/{row['study_uid']}/series/y",
        }
        for row in derived.search(pool, q)  # type: ignore[arg-type]
    ]
    out = []
    for fmt in ("csv", "parquet"):
        times, size = [], 0
        for _ in range(runs):
            t = time.perf_counter()
            size = len(export.respond(rows, MEASUREMENT_COLUMNS, fmt, "bench").body)
            times.append((time.perf_counter() - t) * 1000)
        out.append(
            (
                f"write {len(rows):,} rows as {fmt}",
                statistics.median(times),
                percentile(times, 0.95),
                size,
            )
        )
    return out


def main() -> int:
    """Populate, time and explain; print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="measurement rows")
    parser.add_argument("--per-report", type=int, default=50, help="rows per SR")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per query")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-explain", action="store_true")
    args = parser.parse_args()

    queries = [
        ("concept = SCT:118565006 (Volume)", MeasurementQuery(concept=Code("SCT", "118565006"))),
        (
            "Volume in [5000, 5050] mm3",
            MeasurementQuery(
                concept=Code("SCT", "118565006"), min_value=5000, max_value=5050, unit="mm3"
            ),
        ),
        (
            f"collection lung-ct + site SCT:{SITES[7]}",
            MeasurementQuery(collection="lung-ct", finding_site=Code("SCT", SITES[7])),
        ),
    ]
    with embedded_database("carina-bench-derived-") as url:
        t = time.perf_counter()
        populate(url, args.rows, args.per_report, args.seed)
        load = time.perf_counter() - t
        print(f"{args.rows:,} measurement rows in {args.rows // args.per_report:,} reports;")
        print(f"COPY + VACUUM ANALYZE: {load:.1f} s\n")
        print_timings(url, derived.search, queries, args.runs)
        pool = db.open_pool(url, max_size=2)
        try:
            print(f"\n{'export':<44} {'median ms':>10} {'p95 ms':>8} {'bytes':>10}")
            for name, median, p95, size in timed_export(pool, max(3, args.runs // 4)):
                print(f"{name:<44} {median:>10.2f} {p95:>8.2f} {size:>10,}")
        finally:
            pool.close()
        print("\n(Orthanc has no index of SEG/SR content: no peer column.)")
        if not args.no_explain:
            print_plans(url, derived.search_sql, queries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
