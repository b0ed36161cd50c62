"""Consistency of the index and the object store: every indexed instance has its object (of the
right size, and with --checksums the right content), and nothing in the store or staging area
is left that no index row owns (what a crash between storing and indexing leaves behind)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from psycopg_pool import ConnectionPool

from .errors import NotFound
from .storage import ObjectStore

# Staged files younger than this may belong to a request in flight.
STAGING_GRACE_SECONDS = 3600


@dataclass
class Report:
    """What a check found, by kind: keys or file names, never content."""

    checked: int = 0
    missing: list[str] = field(default_factory=list)
    wrong_size: list[str] = field(default_factory=list)
    wrong_checksum: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    stale_staging: list[str] = field(default_factory=list)
    repaired: int = 0

    @property
    def problems(self) -> int:
        """Everything found that is not as it should be (orphans included)."""
        return (
            len(self.missing)
            + len(self.wrong_size)
            + len(self.wrong_checksum)
            + len(self.orphans)
            + len(self.stale_staging)
        )


def check(
    pool: ConnectionPool,
    store: ObjectStore,
    staging_dir: Path,
    *,
    checksums: bool = False,
    repair: bool = False,
) -> Report:
    """Compare the index with the store; with repair, remove orphans and stale staged files
    (never anything an index row refers to)."""
    report = Report()
    stored = dict(store.inventory())
    indexed: set[str] = set()
    with pool.connection() as conn, conn.cursor(name="fsck") as cur:
        cur.execute("SELECT object_key, size, sha256 FROM instances ORDER BY object_key")
        for key, size, sha256 in cur:
            report.checked += 1
            indexed.add(key)
            if key not in stored:
                report.missing.append(key)
            elif stored[key] != size:
                report.wrong_size.append(key)
            elif checksums and _sha256(store, key) != sha256:
                report.wrong_checksum.append(key)
    report.orphans = sorted(k for k in stored if k not in indexed)
    cutoff = time.time() - STAGING_GRACE_SECONDS
    report.stale_staging = sorted(
        p.name for p in staging_dir.glob("*") if p.is_file() and p.stat().st_mtime < cutoff
    )
    if repair:
        for key in report.orphans:
            store.delete(key)
            report.repaired += 1
        for name in report.stale_staging:
            (staging_dir / name).unlink(missing_ok=True)
            report.repaired += 1
    return report


def _sha256(store: ObjectStore, key: str) -> str | None:
    digest = hashlib.sha256()
    try:
        for chunk in store.iter_chunks(key):
            digest.update(chunk)
    except NotFound:
        return None
    return digest.hexdigest()
