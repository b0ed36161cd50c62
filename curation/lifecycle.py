"""The series lifecycle: incoming -> (settled) -> series rules -> published | quarantined.

Intake writes every new instance's series as incoming and (re)schedules its job on the queue
(archive/jobs.py). A worker (``carina worker``, or a thread of ``carina serve``) takes a due job,
builds the series' facts from the index, runs the collection's rules and, in that same
transaction, stores the findings and QC figures, sets the state, writes the audit row and
removes the job. QIDO and WADO serve published series only, so nothing unevaluated is seen."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import psycopg
from psycopg import Connection
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from carina.archive import derived, jobs, originals

from . import audit, manifests, ocr
from .deid import load_profile
from .errors import ProfileError
from .geometry import Geometry, Metadata, text
from .rule_settings import RuleSettingError, config_from
from .rules import (
    DERIVED_SOP_CLASSES,
    Finding,
    InstanceFacts,
    Manifest,
    ReadFirst,
    RulesConfig,
    check_counts,
    parse_manifest,
    quarantined,
    referenced_series,
    rule_failed,
    run_rules,
    series_facts,
)

log = logging.getLogger(__name__)

INCOMING = "incoming"
PUBLISHED = "published"
QUARANTINED = "quarantined"
REJECTED = "rejected"
# After this many failed attempts (database errors, bugs) a series is held for a curator
# rather than retried for ever.
MAX_ATTEMPTS = 5
# An idle worker looks at the queue at least this often (NOTIFY usually wakes it first).
IDLE_WAIT = 2.0
_MANIFEST_CODES = ("manifest-count", "manifest-unexpected-modality")
_DERIVED_SOURCE_MISSING = "derived-source-missing"


@dataclass(frozen=True)
class Evaluation:
    """What the series rules decided about one series."""

    series_uid: str
    collection: str
    state: str
    findings: tuple[Finding, ...]


# ---------------------------------------------------------------------------------------------
# One job


def evaluate_due(
    pool: ConnectionPool, ocr_env: ocr.OcrEnvironment | None = None
) -> Evaluation | None:
    """Take one due job and decide its series (OCR reading frames from ocr_env's store);
    None when nothing is due (or all are taken). A failure rolls the whole decision back and
    retries the job later. Frames OCR must read are read with no lock held (tesseract takes
    seconds, and intake writing more instances of the series must not wait on its row): the
    decision is rolled back for the reading and taken again, finding the reading."""
    while True:
        try:
            return _evaluate_one(pool, ocr_env)
        except ReadFirst as first:  # rolled back: nothing decided and no row locked
            if first.read is not None:
                first.read()


def _evaluate_one(pool: ConnectionPool, ocr_env: ocr.OcrEnvironment | None) -> Evaluation | None:
    claimed: tuple[str, int] | None = None
    try:
        with pool.connection() as conn, conn.transaction():
            claimed = jobs.claim(conn, ocr_env.readings.being_read() if ocr_env else ())
            if claimed is None:
                return None
            # A decision lost in a crash is lost with its job's deletion (one transaction), so
            # the series is simply evaluated again: no need to wait for the WAL flush.
            conn.execute("SET LOCAL synchronous_commit = off")
            series_uid, attempts = claimed
            if attempts >= MAX_ATTEMPTS:  # either removes the job
                result = _hold_unevaluated(conn, series_uid, attempts)
            else:
                result = decide(conn, series_uid, ocr_env, defer_reading=True)
    except ReadFirst:
        raise
    except Exception as e:
        if claimed is None:
            raise
        # The type only: a message could quote a value (CONVENTIONS: log events, not data).
        log.error("evaluating series %s failed: %s", claimed[0], type(e).__name__)
        jobs.retry_later(pool, claimed[0], type(e).__name__)
        return None
    log.info("series %s %s (%d finding(s))", series_uid, result.state, len(result.findings))
    return result


def _instance_rows(conn: Connection, series_uid: str) -> list[tuple[Any, ...]]:
    """(SOP Instance UID, sha256, metadata, intake findings) of the series' instances, in order."""
    return conn.execute(
        "SELECT sop_uid, sha256, metadata, intake_findings FROM instances"
        " WHERE series_uid = %s ORDER BY instance_number NULLS LAST, sop_uid",
        (series_uid,),
    ).fetchall()


def decide(
    conn: Connection,
    series_uid: str,
    ocr_env: ocr.OcrEnvironment | None = None,
    defer_reading: bool = False,
) -> Evaluation:
    """Run the collection's rules on a series and record the outcome, removing its job, in
    conn's transaction (the caller holds the series row). Without ocr_env no pixels are
    read; with defer_reading, frames not read yet raise ReadFirst (see evaluate_due)."""
    before, collection, overrides, deid = series_head(conn, series_uid)
    findings: list[Finding] = []
    try:
        config = config_from(overrides)
    except RuleSettingError as e:  # stored before a rule changed: judge by defaults, say so
        config = RulesConfig()
        findings.append(rule_failed("settings", e))
    try:
        config = _with_kept_private(config, *deid)
    except ProfileError as e:
        findings.append(rule_failed("private", e))
    config = _with_ocr(conn, series_uid, config, ocr_env, defer_reading)
    rows = _instance_rows(conn, series_uid)
    judged, geometry = _judge(collection, rows, config, _held_sources(conn, rows))
    findings += judged
    findings += _manifest_findings(conn, collection, series_uid)
    _recheck_derived_holds(conn, series_uid)
    state = QUARANTINED if quarantined(findings) else PUBLISHED
    holds = sorted({f.code for f in findings if f.severity == "hold"})
    # The writes need no answer before the next: one round trip for all of them.
    with conn.pipeline():
        _store_findings(conn, series_uid, findings)
        if geometry is not None:
            _store_qc(conn, series_uid, geometry)
        _set_state(conn, series_uid, state)
        # A published series' originals have served their purpose; a held one's are kept.
        (originals.release if state == PUBLISHED else originals.hold)(conn, series_uid)
        reason = ", ".join(holds) or "no rule held the series"
        _record_decision(conn, series_uid, collection, before, state, findings, reason)
    return Evaluation(series_uid, collection, state, tuple(findings))


def series_head(
    conn: Connection, series_uid: str
) -> tuple[str, str, dict[str, Any], tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """The series' state, its collection, the collection's rule overrides and its
    de-identification settings (profile, options, own recipe lines)."""
    row = conn.execute(
        "SELECT se.state, st.collection, c.rules, c.deid_profile, c.deid_options, c.deid_lines"
        " FROM series se JOIN studies st ON st.study_uid = se.study_uid"
        " JOIN collections c ON c.name = st.collection WHERE se.series_uid = %s",
        (series_uid,),
    ).fetchone()
    assert row is not None  # the job's foreign key keeps the series
    return row[0], row[1], row[2], (row[3], tuple(row[4] or ()), tuple(row[5] or ()))


def _with_kept_private(
    config: RulesConfig, profile: str, options: tuple[str, ...], lines: tuple[str, ...]
) -> RulesConfig:
    """The rules' safe private list widened by what the collection's de-identification keeps
    on purpose (PS3.15 Table E.3.10-1 under retain_safe_private, and its own KEEP lines): the
    private rule then holds only what de-identification should have removed."""
    kept = load_profile(profile, options, lines).safe_private
    if not kept:
        return config
    safe = config.private.safe | {(group, creator, offset) for creator, group, offset in kept}
    return replace(config, private=replace(config.private, safe=frozenset(safe)))


def _with_ocr(
    conn: Connection,
    series_uid: str,
    config: RulesConfig,
    env: ocr.OcrEnvironment | None,
    defer: bool,
) -> RulesConfig:
    """The config with an OCR detector reading the series' stored objects, when the
    collection's burned-in rule wants one."""
    burned_in = config.burned_in
    if env is None or not burned_in.enabled or not burned_in.ocr:
        return config
    keys = dict(
        conn.execute(
            "SELECT sop_uid, object_key FROM instances WHERE series_uid = %s", (series_uid,)
        ).fetchall()
    )
    detector = ocr.detector(env, keys, burned_in, defer)
    return replace(config, burned_in=replace(burned_in, detector=detector))


def _judge(
    collection: str, rows: Sequence[tuple[Any, ...]], config: RulesConfig, held: frozenset[str]
) -> tuple[list[Finding], Geometry | None]:
    """The rules' findings and the series geometry from the stored instances."""
    instances = [InstanceFacts(sop, sha, meta) for sop, sha, meta, _ in rows]
    # Residual PHI by the original identifiers was checked by the intake worker, if for all.
    checked = bool(rows) and all(r[3] is not None for r in rows)
    intake_hits = {r[0]: [tuple(h) for h in r[3]] for r in rows} if checked else None
    try:
        facts = series_facts(collection, instances, config.geometry.tolerances)
    except Exception as e:  # unreadable geometry must hold the series, not lose it
        return [rule_failed("geometry", e)], None
    return run_rules(facts, config, None, intake_hits, held), facts.geometry  # type: ignore[arg-type]


def _held_sources(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> frozenset[str]:
    """The series named as sources by the series' derived objects that Carina holds, in any
    state but rejected (read from the stored metadata, so it does not wait for the derived
    index)."""
    metas: list[Metadata] = [r[2] for r in rows]
    wanted = {
        uid
        for meta in metas
        if text(meta, "SOPClassUID") in DERIVED_SOP_CLASSES
        for uid in referenced_series(meta)
    }
    if not wanted:
        return frozenset()
    found = conn.execute(
        "SELECT series_uid FROM series WHERE series_uid = ANY(%s) AND state <> %s",
        (sorted(wanted), REJECTED),
    )
    return frozenset(r[0] for r in found)


def _manifest_findings(conn: Connection, collection: str, series_uid: str) -> list[Finding]:
    """The collection's manifest against what it holds now. When the counts agree, the series
    held for them before are evaluated again."""
    manifest = manifests.current(conn, collection)
    if manifest is None:
        return []
    found = check_counts(manifest, manifests.arrived(conn, collection))
    if not found:
        _recheck_manifest_holds(conn, collection, exclude=series_uid)
    return [replace(f, rule="manifest") for f in found]


def _recheck_manifest_holds(conn: Connection, collection: str, exclude: str | None) -> None:
    """Send the collection's series held for manifest counts back to the queue. They become
    incoming, so no curator decides them while their new evaluation is pending."""
    held = [
        r[0]
        for r in conn.execute(
            "UPDATE series se SET state = %s, decided_at = NULL, updated_at = now()"
            " FROM studies st WHERE st.study_uid = se.study_uid AND st.collection = %s"
            " AND se.state = %s AND se.series_uid IS DISTINCT FROM %s"
            " AND EXISTS (SELECT 1 FROM series_findings f WHERE f.series_uid = se.series_uid"
            " AND f.code = ANY(%s)) RETURNING se.series_uid",
            (INCOMING, collection, QUARANTINED, exclude, list(_MANIFEST_CODES)),
        )
    ]
    with conn.cursor() as cur:
        jobs.schedule(cur, held, 0.0)


def _recheck_derived_holds(conn: Connection, source_uid: str) -> None:
    """Send the series held because their derived objects named this (then missing) source
    series back to the queue, as incoming."""
    waiting = derived.derived_from(conn, source_uid)
    if not waiting:
        return
    held = [
        r[0]
        for r in conn.execute(
            "UPDATE series se SET state = %s, decided_at = NULL, updated_at = now()"
            " WHERE se.series_uid = ANY(%s) AND se.state = %s"
            " AND EXISTS (SELECT 1 FROM series_findings f WHERE f.series_uid = se.series_uid"
            " AND f.code = %s) RETURNING se.series_uid",
            (INCOMING, waiting, QUARANTINED, _DERIVED_SOURCE_MISSING),
        )
    ]
    with conn.cursor() as cur:
        jobs.schedule(cur, held, 0.0)


def _hold_unevaluated(conn: Connection, series_uid: str, attempts: int) -> Evaluation:
    before, collection, _, _ = series_head(conn, series_uid)
    finding = Finding(
        "evaluation-failed",
        "hold",
        f"The series could not be evaluated after {attempts} attempts; see the server log.",
        rule="lifecycle",
    )
    _store_findings(conn, series_uid, [finding])
    _set_state(conn, series_uid, QUARANTINED)
    _record_decision(conn, series_uid, collection, before, QUARANTINED, [finding], finding.code)
    return Evaluation(series_uid, collection, QUARANTINED, (finding,))


def _record_decision(
    conn: Connection,
    series_uid: str,
    collection: str,
    before: str,
    state: str,
    findings: Sequence[Finding],
    reason: str,
) -> None:
    """Audit the worker's decision on a series and remove its job (in the deciding
    transaction)."""
    audit.record(
        conn,
        actor=audit.WORKER,
        action="evaluate",
        series_uid=series_uid,
        collection=collection,
        reason=reason,
        before={"state": before},
        after={"state": state, "findings": sorted({f.code for f in findings})},
    )
    jobs.finish(conn, series_uid)


def _set_state(conn: Connection, series_uid: str, state: str) -> None:
    conn.execute(
        "UPDATE series SET state = %s, decided_at = now(), updated_at = now()"
        " WHERE series_uid = %s",
        (state, series_uid),
    )


def _store_findings(conn: Connection, series_uid: str, findings: Sequence[Finding]) -> None:
    """Replace the series' findings with those of this evaluation."""
    conn.execute("DELETE FROM series_findings WHERE series_uid = %s", (series_uid,))
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO series_findings (series_uid, rule, code, severity, message, details)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            [
                (
                    series_uid,
                    f.rule,
                    f.code,
                    f.severity,
                    f.message,
                    Jsonb(_details(f)),
                )
                for f in findings
            ],
        )


def _details(f: Finding) -> dict[str, Any]:
    """A finding's details column: the attribute, the instances and any text regions."""
    details: dict[str, Any] = {"attribute": f.attribute, "instances": list(f.instances)}
    if f.regions:
        details["regions"] = [asdict(r) for r in f.regions]
    return details


# geometry.Geometry field -> series_qc column, where the names differ.
_QC_COLUMNS = {
    "instances": "instance_count",
    "frames": "frame_count",
    "localizers": "localizer_count",
    "thickness_min": "slice_thickness_min",
    "thickness_max": "slice_thickness_max",
}


def _store_qc(conn: Connection, series_uid: str, geometry: Geometry) -> None:
    """Upsert the series' geometry figures into their searchable columns."""
    figures = geometry.as_dict()
    figures["notes"] = Jsonb(list(figures["notes"]))
    values = {_QC_COLUMNS.get(k, k): v for k, v in figures.items()}
    values["has_localizer"] = geometry.localizers > 0
    columns = ["series_uid", *values]
    conn.execute(
        f"INSERT INTO series_qc ({', '.join(columns)}, computed_at)"
        f" VALUES ({', '.join(['%s'] * len(columns))}, now())"
        " ON CONFLICT (series_uid) DO UPDATE SET "
        + ", ".join(f"{c} = EXCLUDED.{c}" for c in [*values, "computed_at"]),
        [series_uid, *values.values()],
    )


def _purge(pool: ConnectionPool, area: originals.Area) -> None:
    """Purge the originals that decisions made due (also finishing an interrupted purge)."""
    try:
        originals.purge_due(pool, area)
    except OSError as e:  # the area is unavailable: the rows stay due, the next pass retries
        log.error("purging originals failed: %s", type(e).__name__)


# ---------------------------------------------------------------------------------------------
# Manifests


def upload_manifest(pool: ConnectionPool, collection: str, csv_text: str) -> Manifest:
    """Store a manifest CSV for a collection (ManifestError says which line is wrong) and
    evaluate again the series it held before; the collection must exist."""
    manifest = parse_manifest(csv_text)
    with pool.connection() as conn, conn.transaction():
        manifests.store(conn, collection, manifest)
        _recheck_manifest_holds(conn, collection, exclude=None)
    return manifest


# ---------------------------------------------------------------------------------------------
# The loop


class Worker:
    """Evaluates due series until stopped: woken by NOTIFY, or by the next due time."""

    def __init__(
        self,
        pool: ConnectionPool,
        idle_wait: float = IDLE_WAIT,
        originals: originals.Area | None = None,
        ocr_env: ocr.OcrEnvironment | None = None,
    ) -> None:
        self.pool = pool
        self.idle_wait = idle_wait
        self.originals = originals  # whose due originals each pass purges
        self.ocr_env = ocr_env
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, name: str = "series-worker") -> None:
        """Run the loop in a background thread (as `carina serve` does)."""
        self._thread = threading.Thread(target=self.run, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the loop to end after the job in hand; wait for the thread, if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def run(self) -> None:
        """The loop, in the calling thread, until stop(); survives database outages."""
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.pool.conninfo, autocommit=True) as listen:
                    listen.execute(f"LISTEN {jobs.CHANNEL}")
                    log.info("series worker listening on %s", jobs.CHANNEL)
                    while not self._stop.is_set():
                        wait = self._drain()
                        for _ in listen.notifies(timeout=wait, stop_after=1):
                            pass
            except Exception as e:
                log.error("series worker: %s; retrying", type(e).__name__)
                self._stop.wait(self.idle_wait)

    def _drain(self) -> float:
        """Evaluate every due series; the seconds to wait before looking again."""
        while not self._stop.is_set() and evaluate_due(self.pool, self.ocr_env) is not None:
            pass
        if self.originals is not None:
            _purge(self.pool, self.originals)
        with self.pool.connection() as conn:
            due_in = jobs.seconds_to_next(conn)
        return self.idle_wait if due_in is None else min(max(due_in, 0.05), self.idle_wait)


def start_workers(count: int, make: Callable[[], Worker]) -> list[Worker]:
    """count workers, each in a thread of its own: jobs are claimed with SKIP LOCKED, so a
    series whose pixels OCR reads for seconds holds up only its own worker."""
    workers = [make() for _ in range(count)]
    for n, worker in enumerate(workers):
        worker.start(f"series-worker-{n}")
    return workers


def stop_workers(workers: Sequence[Worker]) -> None:
    """Ask every worker to stop, then wait for each."""
    for worker in workers:
        worker._stop.set()
    for worker in workers:
        worker.stop()
