"""What the search benchmarks share: a fresh embedded PostgreSQL with Carina's schema, timed
runs of a search (median and p95 over repeats, after warm-up) and its EXPLAIN ANALYZE."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carina.archive import db  # noqa: E402

Search = Callable[[Any, Any], list[Any]]
Sql = Callable[[Any], tuple[str, list[Any]]]


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank p-th percentile (0 < p <= 1) of values."""
    ordered = sorted(values)
    return ordered[max(0, round(p * len(ordered) + 0.5) - 1)]


@contextmanager
def embedded_database(prefix: str) -> Iterator[str]:
    """The URL of a fresh, migrated embedded PostgreSQL, removed at the end."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        server = db.embedded_server(Path(tmp) / "pg")
        try:
            url = server.get_uri()
            db.migrate(url)
            yield url
        finally:
            server.cleanup()


def timed(search: Search, pool: Any, q: Any, runs: int) -> tuple[float, float, int]:
    """(median ms, p95 ms, rows) of runs searches, after 2 untimed ones."""
    for _ in range(2):
        search(pool, q)
    times = []
    found: list[Any] = []
    for _ in range(runs):
        t = time.perf_counter()
        found = search(pool, q)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), percentile(times, 0.95), len(found)


def print_timings(
    url: str, search: Search, queries: list[tuple[str, Any]], runs: int, width: int = 44
) -> None:
    """A table of the queries' timings (figure, median ms, p95 ms, rows)."""
    pool = db.open_pool(url, max_size=2)
    try:
        print(f"{'figure (limit 100)':<{width}} {'median ms':>10} {'p95 ms':>8} {'rows':>6}")
        for name, q in queries:
            median, p95, n = timed(search, pool, q, runs)
            print(f"{name:<{width}} {median:>10.2f} {p95:>8.2f} {n:>6}")
    finally:
        pool.close()


def explain(url: str, sql_of: Sql, q: Any) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of the search's SQL."""
    sql, params = sql_of(q)
    with psycopg.connect(url) as conn:
        plan = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", params).fetchall()  # type: ignore[arg-type]
    return "\n".join(r[0] for r in plan)


def print_plans(url: str, sql_of: Sql, queries: list[tuple[str, Any]]) -> None:
    """Each query's plan, under its name."""
    for name, q in queries:
        print(f"\n--- EXPLAIN ANALYZE: {name}\n{explain(url, sql_of, q)}")
