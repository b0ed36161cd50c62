"""Rewriting the stored instances of a held series: the one way a curator's changes (pixel
redactions, curation/redaction.py; attribute edits, curation/edits.py) reach the store and the
index.

The series row stays locked, and must be quarantined, for the whole change. Each instance's
object is read, changed in memory, written to staging and moved into the store under a new key
(its content hash in the name), so the old object serves until the index points at the new
one. The index rows, the change's own record and its audit row are written in one transaction;
the old objects are deleted after it commits. A failure in between leaves orphans that
`carina fsck` finds, never an index row without its object or with another content."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from pydicom import Dataset, dcmread

from carina.archive import index
from carina.archive.storage import ObjectStore

from . import audit, intake
from .errors import ChangeRefused, UnknownSeries
from .lifecycle import QUARANTINED
from .quarantine import lock_series, require_state

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """One instance a change applies to: its UIDs and where its object is stored now."""

    sop_uid: str
    study_uid: str
    object_key: str


@dataclass(frozen=True)
class Held:
    """The series a change applies to, locked in the change's transaction."""

    series_uid: str
    collection: str
    targets: tuple[Target, ...]


Change = Callable[[Dataset, Target], None]
"""Changes one instance's dataset in place; raises ChangeRefused when it cannot apply."""
Record = Callable[[Connection, Held], None]
"""Writes the change's own rows and its audit row, in the change's transaction."""


def apply(
    pool: ConnectionPool,
    store: ObjectStore,
    staging_dir: Path,
    series_uid: str,
    sops: Sequence[str] | None,
    change: Change,
    record: Record,
) -> Held:
    """Apply change to the instances sops (None: every one) of a quarantined series, then
    record it; UnknownSeries for an unknown series or instance, DecisionRefused (409) when the
    series is not held, ChangeRefused (422) when the change does not apply."""
    rewritten: list[tuple[intake.InstanceRecord, str, Path]] = []
    stored: list[str] = []
    previous: set[str] = set()
    with pool.connection() as conn:
        try:
            with conn.transaction():
                held = _held(conn, series_uid, sops)
                previous = {t.object_key for t in held.targets}
                for target in held.targets:
                    rewritten.append(_rewrite(store, staging_dir, held, target, change))
                errors = store.put_files([(key, path) for _, key, path in rewritten])
                stored = [key for (_, key, _), e in zip(rewritten, errors, strict=True) if not e]
                failed = [e for e in errors if e is not None]
                if failed:
                    raise failed[0]
                index.rewrite_instances(conn, [(r, key) for r, key, _ in rewritten])
                record(conn, held)
        except BaseException:
            for _, _, path in rewritten:
                path.unlink(missing_ok=True)  # those not moved into the store
            # Never an object the index still points at (unchanged content keeps its key).
            delete_objects(store, [key for key in stored if key not in previous])
            raise
    delete_objects(store, sorted(previous - set(stored)))
    log.info("series %s: %d instance(s) rewritten", series_uid, len(held.targets))
    return held


def _held(conn: Connection, series_uid: str, sops: Sequence[str] | None) -> Held:
    """The series locked (it must be quarantined) and the instances the change names."""
    state, collection = lock_series(conn, series_uid)
    require_state(state, (QUARANTINED,), "change")
    rows = conn.execute(
        "SELECT sop_uid, study_uid, object_key FROM instances WHERE series_uid = %s"
        " ORDER BY instance_number NULLS LAST, sop_uid",
        (series_uid,),
    ).fetchall()
    found = {r[0]: Target(*r) for r in rows}
    if sops is None:
        return Held(series_uid, collection, tuple(found.values()))
    missing = [s for s in sops if s not in found]
    if missing:
        raise UnknownSeries(f"no instance {missing[0]} in series {series_uid}")
    return Held(series_uid, collection, tuple(found[s] for s in dict.fromkeys(sops)))


def _rewrite(
    store: ObjectStore, staging_dir: Path, held: Held, target: Target, change: Change
) -> tuple[intake.InstanceRecord, str, Path]:
    """The changed instance staged: its index record, its new object key, its staged file."""
    ds = dcmread(BytesIO(store.read(target.object_key)))
    change(ds, target)
    if str(ds.SOPInstanceUID) != target.sop_uid:
        raise ChangeRefused("a change may not touch the SOP Instance UID")
    staging = staging_dir / f"{uuid.uuid4().hex}.dcm"
    found = staged(ds, held.collection, staging)
    key = f"{found.study_uid}/{found.series_uid}/{found.sop_uid}.{found.sha256[:16]}.dcm"
    return found, key, staging


def staged(
    ds: Dataset, collection: str, staging: Path, warning: int = 0, findings: str | None = None
) -> intake.InstanceRecord:
    """Write a changed dataset to its staging file and make the record intake would have
    written for it (warning and the intake's residual-PHI findings carried over)."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    sha256 = hashlib.sha256(data).hexdigest()
    staging.write_bytes(data)
    try:
        full = intake.dicom_json(ds)
        ctx = intake.IntakeContext(collection, b"", "", (), str(staging.parent))
        return intake.instance_record(ds, ctx, staging, len(data), sha256, warning, full, findings)
    except Exception:
        staging.unlink(missing_ok=True)
        raise


def audited(
    conn: Connection, held: Held, actor: str, action: str, reason: str, after: dict[str, Any]
) -> None:
    """Audit a change to a held series, in the change's transaction."""
    audit.record(
        conn,
        actor=actor,
        action=action,
        series_uid=held.series_uid,
        collection=held.collection,
        reason=reason,
        before={"state": QUARANTINED},
        after=after,
    )


def reapply(
    ds: Dataset, recorded: Sequence[tuple[str, T]], change: Callable[[Dataset, T], None]
) -> bool:
    """Apply again to ds, with change, every recorded change (redaction.recorded,
    edits.recorded) of its SOP Instance UID, oldest first; whether any was."""
    mine = [c for sop, c in recorded if sop == str(ds.get("SOPInstanceUID", ""))]
    for c in mine:
        change(ds, c)
    return bool(mine)


def listed(pool: ConnectionPool, series_uid: str) -> dict[str, list[dict[str, Any]]]:
    """The redactions and edits recorded for a series (migration 016), oldest first."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT sop_uid, frames, rectangles, actor, reason, at FROM pixel_redactions"
            " WHERE series_uid = %s ORDER BY pk",
            (series_uid,),
        )
        redactions = cur.fetchall()
        cur.execute(
            "SELECT sop_uid, keyword, tag, action, element, actor, reason, at"
            " FROM attribute_edits WHERE series_uid = %s ORDER BY pk",
            (series_uid,),
        )
        return {"redactions": redactions, "edits": cur.fetchall()}


def delete_objects(store: ObjectStore, keys: Sequence[str]) -> None:
    """Delete replaced objects no index row points at any more; a failure is logged and left
    to `carina fsck --repair`."""
    for key in keys:
        try:
            store.delete(key)
        except Exception as e:
            log.error(
                "replaced object not deleted (carina fsck --repair will): %s", type(e).__name__
            )
