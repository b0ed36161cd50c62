"""Reprocessing a series with another de-identification profile, from its kept originals.

A curator picks a profile and PS3.15 options (the collection's own recipe lines still apply);
each kept original (archive/originals.py) is decrypted in an intake worker and de-identified
again exactly as intake does it, with the collection's pseudonym keys, so every UID, research
ID and date shift comes out as before and only what the profile keeps or removes differs. The
new objects replace the stored ones and their index rows, and the series is judged again by
its rules; the decision is audited with the profile and options.

All or nothing until the objects are stored: an original that is missing or cannot be
decrypted (another key, altered) refuses the whole reprocessing, with the reason, before
anything changes. Without kept originals (purged once the series was published, or never
kept) the reprocessing is refused too (409)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from psycopg_pool import ConnectionPool
from pydicom import dcmread

from carina.archive import collections, originals
from carina.archive.errors import StorageError
from carina.archive.originals import Kept, OriginalUnreadable, Sealer

from . import edits, quarantine, redaction, rewrite
from .deid import OPTIONS, load_profile
from .errors import CurationError, DecisionRefused, ProfileError
from .intake import (
    PROCESSING_FAILURE,
    BatchResult,
    InstanceRecord,
    Intake,
    IntakeContext,
    Outcome,
    Refusal,
    process_part,
)

# A reprocessing stopped between its audit and storing its objects leaves the series to be
# judged as it was, this many seconds later.
FALLBACK_DELAY = 60.0


class OriginalsUnavailable(DecisionRefused):
    """The series' originals are not (all) kept, or one cannot be decrypted."""


class ProfileChoiceRefused(CurationError):
    """The profile or options asked for do not exist, or cannot apply to a reprocessing."""


@dataclass(frozen=True)
class Choice:
    """A de-identification profile and its options, as a reprocessing applies them."""

    profile: str
    options: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """As audited and answered."""
        return {"profile": self.profile, "options": list(self.options)}


def profiles() -> tuple[str, ...]:
    """The de-identification profiles of deid_profiles/ (recipes that are not options)."""
    recipes = resources.files("carina.deid_profiles") / "recipes"
    names = (Path(str(p)).stem for p in recipes.iterdir() if str(p).endswith(".dicom"))
    return tuple(sorted(n for n in names if n not in OPTIONS))


def choose(
    collection: collections.Collection, profile: str | None, options: Sequence[str] | None
) -> Choice:
    """The profile and options a reprocessing of one of the collection's series applies: those
    asked for, the collection's where none are (ProfileChoiceRefused saying what is wrong)."""
    name = profile if profile is not None else collection.deid_profile
    opts = tuple(options) if options is not None else collection.options
    if name not in profiles():
        raise ProfileChoiceRefused(
            f"unknown de-identification profile {name!r}; known: {', '.join(profiles())}"
        )
    # The stored objects and every reference to them are named by their UIDs.
    if ("retain_uids" in opts) != ("retain_uids" in collection.options):
        raise ProfileChoiceRefused(
            "reprocessing keeps the series' UIDs: the retain_uids option can be neither added "
            "nor removed"
        )
    try:
        load_profile(name, opts, collection.recipe_lines)
    except ProfileError as e:
        raise ProfileChoiceRefused(str(e)) from None
    return Choice(name, tuple(o for o in OPTIONS if o in opts))


def choices(pool: ConnectionPool, series_uid: str) -> dict[str, Any]:
    """What the series page offers for a reprocessing: the profiles and options, the
    collection's own, and how many of the series' instances have their original kept."""
    collection = collections.get(pool, quarantine.collection_of(pool, series_uid))
    with pool.connection() as conn:
        kept = len(originals.of_series(conn, series_uid))
    return {
        "profiles": profiles(),
        "options": OPTIONS,
        "profile": collection.deid_profile,
        "chosen": collection.options,
        "kept": kept,
    }


def redo(kept: Kept, sealer: Sealer, ctx: IntakeContext) -> Outcome:
    """In an intake worker: decrypt one kept original and de-identify it again."""
    try:
        data = sealer.read(kept.name, kept.sop_uid)
    except OriginalUnreadable as e:
        return Refusal(PROCESSING_FAILURE, str(e), sop_uid=kept.sop_uid)
    return process_part(data, ctx)


def reprocess(
    intake: Intake,
    series_uid: str,
    actor: str,
    reason: str,
    profile: str | None,
    options: Sequence[str] | None,
) -> tuple[Choice, int]:
    """De-identify a decided series again from its kept originals with the chosen profile and
    options, replace its objects and index rows, and send it through the rules again; the
    choice applied and the number of instances. UnknownSeries, DecisionRefused (its state),
    OriginalsUnavailable, ProfileChoiceRefused, StorageError."""
    pool = intake.db_pool
    assert isinstance(pool, ConnectionPool)
    name = quarantine.collection_of(pool, series_uid)
    choice = choose(collections.get(pool, name), profile, options)
    kept = _kept(pool, series_uid)
    if intake.originals is None:
        raise OriginalsUnavailable("this server keeps no originals")
    ctx = replace(
        intake.context(name), profile=choice.profile, options=choice.options, originals=None
    )
    sealer = intake.originals.sealer(name)
    outcomes = intake.run_in_workers(redo, [(k, sealer, ctx) for k in kept])
    records = [o for o in outcomes if isinstance(o, InstanceRecord)]
    try:
        _check(kept, outcomes, series_uid)
        outcomes = _changed_again(pool, series_uid, name, outcomes)
        previous = _object_keys(pool, series_uid)
        quarantine.reprocess(
            pool, series_uid, actor, reason, deid=choice.as_dict(), delay=FALLBACK_DELAY
        )
    except Exception:
        for r in records:
            Path(r.staging_path).unlink(missing_ok=True)
        raise
    result = BatchResult(list(outcomes))
    intake.store_batch(result, 0.0)  # the series is incoming again and judged at once
    # Objects a curator's change had rewritten under keys of their own are replaced now.
    stored = {r.object_key for r in result.stored}
    rewrite.delete_objects(intake.store, sorted(previous - stored))
    if result.refused:
        raise StorageError(
            f"{len(result.refused)} of {len(kept)} reprocessed instances were not stored: "
            f"{result.refused[0].reason}"
        )
    return choice, len(kept)


def _changed_again(
    pool: ConnectionPool, series_uid: str, collection: str, outcomes: list[Outcome]
) -> list[Outcome]:
    """The curator's recorded redactions and edits (migration 016) applied again to the newly
    de-identified instances, so no redacted pixel and no edited-out value comes back; the
    intake's residual-PHI hits in edited attributes are dropped as the edit dropped them.
    Only the instances a change names are read back and staged again."""
    with pool.connection() as conn:
        redactions = redaction.recorded(conn, series_uid)
        edited = edits.recorded(conn, series_uid)
    changed = {sop for sop, _ in redactions} | {sop for sop, _ in edited}
    if not changed:
        return outcomes
    out: list[Outcome] = []
    for o in outcomes:
        if isinstance(o, InstanceRecord) and o.sop_uid in changed:
            ds = dcmread(o.staging_path)
            rewrite.reapply(ds, redactions, redaction.redact_dataset)
            rewrite.reapply(ds, edited, edits.apply_edit)
            keywords = {e.keyword for sop, e in edited if sop == o.sop_uid}
            findings = edits.without_hits(o.intake_findings, keywords)
            new = rewrite.staged(ds, collection, Path(o.staging_path), o.warning, findings)
            o = replace(new, original=o.original)
        out.append(o)
    return out


def _object_keys(pool: ConnectionPool, series_uid: str) -> set[str]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT object_key FROM instances WHERE series_uid = %s", (series_uid,)
        ).fetchall()
    return {r[0] for r in rows}


def _kept(pool: ConnectionPool, series_uid: str) -> list[Kept]:
    """The series' kept originals, one for each of its instances (OriginalsUnavailable, or
    DecisionRefused for a series that cannot be reprocessed, otherwise)."""
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT state, (SELECT count(*) FROM instances i WHERE i.series_uid = s.series_uid)"
            " FROM series s WHERE s.series_uid = %s",
            (series_uid,),
        ).fetchone()
        kept = originals.of_series(conn, series_uid)
    assert row is not None  # collection_of found it
    state, count = row
    if state not in quarantine.REPROCESSABLE:
        raise DecisionRefused(
            f"cannot reprocess a series that is {state}; only a series that is "
            + " or ".join(quarantine.REPROCESSABLE)
        )
    if not count or len(kept) < count:
        raise OriginalsUnavailable(
            f"series {series_uid} has its original kept for {len(kept)} of its {count} "
            "instances (originals are purged when a series is published or rejected): it "
            "cannot be de-identified again"
        )
    return kept


def _check(kept: list[Kept], outcomes: list[Outcome], series_uid: str) -> None:
    """Every original was de-identified again into the instance it was kept for."""
    for k, outcome in zip(kept, outcomes, strict=True):
        if isinstance(outcome, Refusal):
            # The de-identified UID only: a refusal's own UID may be the original's.
            raise OriginalsUnavailable(
                f"instance {k.sop_uid} cannot be reprocessed: {outcome.reason}"
            )
        if (outcome.sop_uid, outcome.series_uid) != (k.sop_uid, series_uid):
            raise ProfileChoiceRefused(
                f"de-identified again, instance {k.sop_uid} gets other UIDs; reprocessing "
                "keeps them"
            )
