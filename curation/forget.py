"""`carina subject forget`: remove one subject of a collection everywhere, given either its
original PatientID or a research PatientID (its keyed pseudonym or a mapped research ID).

The original ID is turned into the research IDs intake gave it (the keyed pseudonym, and the
mapped research ID when the collection's mapping names it), exactly as intake computes them
(pseudonyms.py). archive/erasure.py withdraws the index rows and then deletes the objects;
this module also removes the files of the local work areas it can attribute to the subject:
de-identified files staged for the store (by their research PatientID) and identified parts
spooled in the intake area (by the research ID their original PatientID maps to).

Nothing identified is printed, logged or kept: the report holds the kind of identifier given
and counts, and the erasure record adds only keyed digests (see migrations/012)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from psycopg_pool import ConnectionPool
from pydicom import dcmread

from carina.archive import erasure, mappings, originals
from carina.archive.erasure import Counts, Erasure, Subject
from carina.archive.storage import ObjectStore

from .errors import CurationError
from .intake import quiet_pydicom
from .pseudonyms import Pseudonymizer, collection_key

log = logging.getLogger(__name__)


class UnknownSubject(CurationError):
    """Neither the index nor the mapping holds the subject, and it was never forgotten."""


class WrongKey(CurationError):
    """The collection's mapping was made with another secret key: its digests cannot match."""


@dataclass
class Report:
    """What one `carina subject forget` did (or, in a dry run, would do)."""

    collection: str
    kind: str
    dry_run: bool
    counts: Counts
    staged_files: int = 0
    intake_files: int = 0
    objects_deleted: int = 0
    erasure_id: int | None = None
    # set when nothing was left because the subject had been forgotten before
    previous: Erasure | None = None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report as printed: counts by name, never an identifier."""
        head = f"collection {self.collection}, {self.kind} PatientID given"
        if self.previous is not None and not self.counts.found:
            done = self.previous.completed_at or self.previous.at
            head += f": already forgotten (erasure {self.previous.id}, {done.isoformat()})"
        elif self.erasure_id is not None:
            head += f": erasure {self.erasure_id}"
        rows = [
            ("patients", self.counts.patients),
            ("studies", self.counts.studies),
            ("series", self.counts.series),
            ("instances", self.counts.instances),
            ("derived objects among them", self.counts.derived_objects),
            # a dry run deletes nothing: every instance's object would go
            ("stored objects", self.counts.instances if self.dry_run else self.objects_deleted),
            ("pseudonym mapping entries", self.counts.mapping_entries),
            ("access audit rows unlinked from their study", self.counts.audit_rows),
            (
                "curation audit rows unlinked from their series",
                self.counts.curation_audit_rows,
            ),
            ("kept originals", self.counts.originals),
            ("staged files", self.staged_files),
            ("intake files", self.intake_files),
        ]
        verb = "dry run, nothing changed; would remove:" if self.dry_run else "removed:"
        return [head, verb, *(f"  {label}: {n}" for label, n in rows), *self.notes]


@dataclass(frozen=True)
class Forgetter:
    """Everything forgetting needs, built once from the settings by the CLI."""

    pool: ConnectionPool
    store: ObjectStore
    master_key: bytes
    staging_dir: Path
    intake_dir: Path
    originals: originals.Area | None = None

    def forget(
        self,
        collection: str,
        *,
        original_id: str | None = None,
        research_id: str | None = None,
        actor: str,
        dry_run: bool = False,
    ) -> Report:
        """Forget the subject named by exactly one of original_id and research_id.
        NotFound for an unknown collection, UnknownSubject for an unknown subject, WrongKey
        when the collection's mapping was made with another key."""
        subject, original_matches = resolve(
            self.pool,
            self.master_key,
            collection,
            original_id=original_id,
            research_id=research_id,
        )
        previous = erasure.previous(self.pool, subject)
        # A rerun no longer finds the mapping entry: the digests recorded then still match.
        known = frozenset(previous.forgotten if previous else ())
        quiet_pydicom()  # identified files are read below: pydicom's warnings quote values
        staged = [p for p in _files(self.staging_dir) if _patient_id(p) in subject.patient_ids]
        spooled = [p for p in _files(self.intake_dir) if original_matches(_patient_id(p), known)]
        erasure_id, counts = erasure.withdraw(
            self.pool, subject, actor, dry_run=dry_run, record_empty=bool(staged or spooled)
        )
        report = Report(collection, subject.kind, dry_run, counts, erasure_id=erasure_id)
        report.staged_files, report.intake_files = len(staged), len(spooled)
        if not counts.found:
            report.previous = previous
            if previous is None and not staged and not spooled:
                raise UnknownSubject(
                    f"collection {collection} holds no subject with that {subject.kind} "
                    "PatientID, and none was forgotten"
                )
        if dry_run:
            return report
        for path in (*staged, *spooled):
            path.unlink(missing_ok=True)
        if erasure_id is not None:
            erasure.record_files(
                self.pool, erasure_id, {"staged_files": len(staged), "intake_files": len(spooled)}
            )
        # This erasure, and any that an earlier run left unfinished.
        report.objects_deleted = erasure.finish_pending(self.pool, self.store)
        if self.originals is not None:  # its kept originals, due since the withdrawal
            originals.purge_due(self.pool, self.originals)
        if subject.kind == erasure.RESEARCH and counts.mapping_entries:
            report.notes.append(
                "note: instances stored before the mapping carry the keyed pseudonym, which "
                "only the original PatientID leads to; forget by original ID to reach them"
            )
        return report


def resolve(
    pool: ConnectionPool,
    master_key: bytes,
    collection: str,
    *,
    original_id: str | None = None,
    research_id: str | None = None,
) -> tuple[Subject, Callable[[str | None, frozenset[bytes]], bool]]:
    """The subject named by exactly one of original_id and research_id, as the index knows
    it, and a test of whether an original PatientID (of a file in the intake area) is the
    subject's: whether it maps to one of the subject's research IDs, or its digest is one of
    the subject's or of the given digests of an earlier erasure. NotFound for an unknown
    collection; WrongKey when an original ID cannot be looked up in the collection's mapping."""
    key = collection_key(master_key, collection)
    mapping = mappings.load(pool.conninfo, collection)
    keyed = Pseudonymizer(key)
    mapped = Pseudonymizer(key, subjects=mapping.subjects)
    if mapping.subjects and mapping.key_check != mapped.key_check():
        if research_id is None:  # the original ID could not be looked up in it
            raise WrongKey(
                f"collection {collection}'s pseudonym mapping was loaded with another "
                "secret key: use the server's key (its data directory or CARINA_SECRET_KEY)"
            )
        mapped = keyed  # intake refuses instances of this collection: nothing was mapped
    if research_id is not None:
        ids = frozenset({research_id.strip()})
        # A mapped research ID names its subject's original ID digest in the mapping.
        digest = next((d for d, s in mapping.subjects.items() if s.research_id in ids), None)
        forgotten = _forgotten(keyed, ids) + ((keyed.forgotten_original(digest),) if digest else ())
        subject = Subject(collection, erasure.RESEARCH, ids, forgotten, digest)
    else:
        assert original_id is not None
        # Instances received before the mapping carry the keyed pseudonym, those after it the
        # mapped research ID: both are the subject's.
        ids = frozenset({keyed.patient_id(original_id), mapped.patient_id(original_id)})
        digest = mapped.subject_digest(original_id)
        forgotten = (*_forgotten(keyed, ids), keyed.forgotten_original(digest))
        subject = Subject(collection, erasure.ORIGINAL, ids, forgotten, digest)

    def matches(original: str | None, known: frozenset[bytes] = frozenset()) -> bool:
        return original is not None and (
            keyed.patient_id(original) in ids
            or mapped.patient_id(original) in ids
            or keyed.forgotten_original(keyed.subject_digest(original))
            in {*subject.forgotten, *known}
        )

    return subject, matches


def _forgotten(keyed: Pseudonymizer, research_ids: frozenset[str]) -> tuple[bytes, ...]:
    """Keyed digests that recognise these research IDs as forgotten, and reveal nothing."""
    return tuple(keyed.forgotten_research_id(i) for i in sorted(research_ids))


def _patient_id(path: Path) -> str | None:
    """The PatientID in a file's header; None for what is not DICOM (or has none)."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"], force=True)
    except Exception:  # noqa: BLE001 - a file that cannot be read names no subject
        return None
    value = ds.get("PatientID")
    return str(value).strip() if value is not None else None


def _files(directory: Path) -> Iterator[Path]:
    if directory.is_dir():
        yield from (p for p in sorted(directory.rglob("*")) if p.is_file())
