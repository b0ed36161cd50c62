"""Early admission: a C-STORE acknowledged once its instance is parsed, checked, and its
original durable in the intake area; de-identified, stored and indexed right after, in the
background, several instances at a time and indexed in batches (group commit).

A sender sends the next instance only after the status of the last one, so every step before
the status counts in full: parsing, de-identification, the store's and the index's flushes in
series took ~7.7 ms per instance. As the Clinical Trial Processor (the tool TCIA receives and
anonymizes submissions with) does, Carina answers once the received object is safely queued:
the C-STORE handler's thread hands the instance to an intake worker, then seals its original
(archive/originals, the collection's originals key) into the association's directory of the
intake area and flushes file and directory (fsync) while the worker parses and checks it and
tells the caller (curation/workers tell()) before it goes on (if every worker is busy, it
seals first and then waits for one). Once both are done the C-STORE handler answers; a
finisher thread takes the worker's result and a committer thread stores and indexes what has
arrived in one batch through the intake's own commit. The worker starts writing its staged
file to disk as soon as it is written (a filesystem store's): the batch's flush then finds
it written, where writing the whole batch then held up the senders' own flushes and their
releases (bench/dimse.py, 4 associations, 3 interleaved runs: 229 -> 238 instances/s). The
pending original then becomes the kept one (renamed into the originals area, its seal
already naming the de-identified SOP Instance UID). A refused instance's pending original
is removed before the status goes out.

Nothing acknowledged is lost: an instance whose processing fails afterwards (worker ended,
store full, index down) keeps its pending original and is processed again from it, with
back-off, while the server runs; at start-up, before the listener listens, every pending
original left by a process that ended (its directory's lock is free) is processed. One already
indexed (a crash after the commit, before the rename) is only finished. An instance refused
after its acknowledgement (its subject forgotten meanwhile, say) is logged by its
de-identified UID and counted refused in its association's submission report.

Layout: intake/pending/<process>/ (locked by the process for its lifetime) holds one directory
per association: context.json (collection, submission; nothing identified) and the pending
originals, named <name>-<de-identified SOP Instance UID> (archive/originals.pending_name)."""

from __future__ import annotations

import fcntl
import heapq
import itertools
import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

from carina.archive import originals, submissions
from carina.archive.originals import OriginalUnreadable

from .intake import (
    FORGOTTEN,
    NOT_AUTHORIZED,
    PROCESSING_FAILURE,
    WORKER_ENDED,
    Admission,
    BatchResult,
    InstanceRecord,
    Intake,
    IntakeContext,
    Outcome,
    Refusal,
    Told,
    deidentified_sop_uid,
    process_part,
)
from .workers import WorkerDied

log = logging.getLogger(__name__)

# Instances indexed in one transaction at most, and seconds the committer waits for more after
# the first: nobody waits for the commit of an admitted instance, and each transaction (a few
# round trips, the store's and the index's flushes) costs about as much CPU for one instance
# as for ten. Over one association (bench/dimse.py, quiet 2 cores) 0.1 s gave 194-196/s, 0.02 s
# 177-185/s and 0.25 s 168/s: fewer commits take the listener's GIL less often, but one of
# many instances holds it for long.
COMMIT_BATCH = 64
COMMIT_WINDOW = 0.1
# Back-off of an instance whose processing failed after its acknowledgement: first wait, cap.
RETRY_FIRST = 1.0
RETRY_MAX = 60.0
# Times a failure of the worker itself (not of the store or index) is retried before the
# instance is refused: the same bytes would fail the same way.
WORKER_ATTEMPTS = 3
_CONTEXT = "context.json"
# Put on the committer's queue to wake it when a sender starts waiting (Admitter._hurry).
_HURRY = object()
_LOCK = ".owner"


@dataclass(frozen=True)
class Admitted:
    """An instance acknowledged on admission: what its C-STORE status says."""

    sop_uid: str  # de-identified
    series_uid: str  # de-identified
    warning: int = 0


class Admissions:
    """The instances one sender (a C-STORE association) had acknowledged on admission, until
    each is committed or refused; what became of them."""

    def __init__(
        self,
        directory: Path,
        collection: str,
        submission_id: int | None,
        recovered: bool = False,
        hurry: Callable[[int], None] | None = None,
    ) -> None:
        self.directory = directory
        self.collection = collection
        self.submission_id = submission_id
        # Taken over from a process that ended: its submission's report was never written.
        self.recovered = recovered
        # Told +1 while someone waits for this sender's instances, -1 after (Admitter._hurry).
        self._hurry = hurry
        self._cond = threading.Condition()
        self._outstanding = 0
        self._closed = False
        # De-identified Series Instance UID -> instances committed.
        self.series: Counter[str] = Counter()
        self.refusals: list[Refusal] = []

    def _add(self) -> None:
        with self._cond:
            self._outstanding += 1

    def _finished(self, outcome: InstanceRecord | Refusal | None) -> bool:
        """Count an instance done (None: committed before, by a process that ended); False
        if the sender's report is written already."""
        with self._cond:
            self._outstanding -= 1
            self._cond.notify_all()
            if self._closed:
                return False
            if isinstance(outcome, InstanceRecord):
                self.series[outcome.series_uid] += 1
            elif outcome is not None:
                self.refusals.append(outcome)
            return True

    def wait(self, timeout: float) -> bool:
        """Until every admitted instance is committed or refused (False: timeout passed);
        the committer does not wait for more instances to batch with them meanwhile."""
        with self._cond:
            if self._outstanding <= 0:
                return True
        if self._hurry is not None:
            self._hurry(1)
        try:
            with self._cond:
                return self._cond.wait_for(lambda: self._outstanding <= 0, timeout)
        finally:
            if self._hurry is not None:
                self._hurry(-1)

    def close(self) -> tuple[Counter[str], list[Refusal]]:
        """The sender is done and its report is written now: what was committed (series) and
        refused so far; what becomes of the rest is added to its submission later."""
        with self._cond:
            self._closed = True
            return Counter(self.series), list(self.refusals)

    @property
    def idle(self) -> bool:
        """Closed with nothing outstanding: its directory can go."""
        with self._cond:
            return self._closed and self._outstanding <= 0


@dataclass(order=True)
class _Ticket:
    """An admitted instance until it is committed or refused."""

    due: float
    seq: int
    pending: Path = field(compare=False)
    group: Admissions = field(compare=False)
    attempts: int = field(default=0, compare=False)  # retries so far (the back-off)
    failures: int = field(default=0, compare=False)  # of the worker itself


class Admitter:
    """Early admission over an Intake's thread workers (see the module's docstring)."""

    def __init__(self, intake: Intake) -> None:
        if intake.originals is None:
            raise ValueError("early admission needs the originals area")
        self.intake = intake
        self.area = intake.originals
        self.root = intake.intake_dir / "pending"
        self.root.mkdir(mode=0o700, exist_ok=True)
        self.directory = self.root / uuid.uuid4().hex
        self.directory.mkdir(mode=0o700)
        # Held for the process's lifetime: recovery leaves a live process's directory alone.
        self._lock = _try_lock(self.directory)
        assert self._lock is not None
        self._seq = itertools.count()
        self._finishers = ThreadPoolExecutor(intake.workers, thread_name_prefix="admit-finish")
        self._commits: queue.Queue[tuple[_Ticket, Outcome] | object | None] = queue.Queue()
        # Senders waiting for their instances' commit (Admissions.wait): while there are any,
        # the committer commits what has arrived without waiting out COMMIT_WINDOW.
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self._retries: list[_Ticket] = []
        self._retry_cond = threading.Condition()
        self._stopping = False
        self._committer = threading.Thread(
            target=self._commit_loop, name="admit-commit", daemon=True
        )
        self._retrier = threading.Thread(target=self._retry_loop, name="admit-retry", daemon=True)
        self._committer.start()
        self._retrier.start()

    # -----------------------------------------------------------------------------------------
    # The C-STORE handler's side

    def open(self, collection: str, submission_id: int | None) -> Admissions:
        """The admissions of a new sender into collection (its submission's id, if any)."""
        directory = self.directory / uuid.uuid4().hex
        directory.mkdir(mode=0o700)
        context = {"collection": collection, "submission_id": submission_id}
        fd = os.open(directory / _CONTEXT, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(context, f)
            f.flush()
            os.fsync(f.fileno())
        originals.sync_dirs([directory, self.directory])
        return Admissions(directory, collection, submission_id, hurry=self._hurry)

    def admit(
        self, payload: bytes, ctx: IntakeContext, group: Admissions, warnings: bool
    ) -> Outcome | Admitted:
        """Process one instance of group's sender; return once it is admitted (its original
        durable), refused, or (when it cannot be admitted early: a derived object, an
        original too large to keep) stored and indexed. With warnings, the admission carries
        de-identification's warning (IntakeContext.admit_with_warning). The original is sealed
        into the sender's directory and flushed here, on the caller's thread, while the
        worker parses and checks it (Intake.start_one's meanwhile)."""
        sealer = ctx.originals
        if sealer is None or ctx.sop_instance is None or len(payload) > originals.MAX_SIZE:
            return self.intake.ingest_one(payload, ctx)
        # The name holds the de-identified SOP Instance UID the worker will give.
        pending = sealer.pending_path(group.directory, deidentified_sop_uid(ctx))
        kept: list[BaseException | None] = []

        def keep() -> None:
            try:
                if not sealer.write_pending(pending, payload):  # too large (checked above)
                    raise ValueError("original not written")
                kept.append(None)
            except Exception as e:  # noqa: BLE001 - refused below: nothing kept
                kept.append(e)

        ctx = replace(
            ctx,
            pending=str(pending),
            admit_with_warning=warnings,
            write_back=self.intake.store.stores_staged_in_place,
        )
        try:
            first: Outcome | Told = self.intake.start_one(payload, ctx, meanwhile=keep)
        except WorkerDied:
            first = Refusal(PROCESSING_FAILURE, WORKER_ENDED)
        failed = None
        error = kept[0] if kept else ValueError("original not written")
        if error is not None:
            log.error("original not kept in the intake area: %s", type(error).__name__)
            failed = Refusal(PROCESSING_FAILURE, f"processing failure: {type(error).__name__}")
        if not isinstance(first, Told):  # refused, or not admitted early: as ingest_one
            pending.unlink(missing_ok=True)
            return self.intake.commit_one(first)
        ticket = _Ticket(0.0, next(self._seq), pending, group)
        if failed is not None:
            self._finishers.submit(self._finish, first, ticket, False)
            return failed
        admission: Admission = first.value
        try:
            forgotten = bool(self.intake.forgotten([admission]))
        except Exception:  # noqa: BLE001 - the index transaction checks again
            forgotten = False
        if not forgotten:
            group._add()
        self._finishers.submit(self._finish, first, ticket, not forgotten)
        if forgotten:
            return Refusal(NOT_AUTHORIZED, FORGOTTEN, admission.sop_class_uid)
        return Admitted(admission.sop_uid, admission.series_uid, admission.warning)

    def _finish(self, told: Told, ticket: _Ticket, accepted: bool) -> None:
        """The worker's result for an admitted instance, to the committer (or, for one
        refused at admission, thrown away with its pending original)."""
        try:
            outcome: Outcome = told.outcome()
        except WorkerDied:
            outcome = Refusal(PROCESSING_FAILURE, WORKER_ENDED)
        except Exception as e:  # noqa: BLE001 - processed again from its pending original
            outcome = Refusal(PROCESSING_FAILURE, f"processing failure: {type(e).__name__}")
        if accepted:
            self._commits.put((ticket, outcome))
            return
        if isinstance(outcome, InstanceRecord):
            self.intake.discard(outcome)
        ticket.pending.unlink(missing_ok=True)

    # -----------------------------------------------------------------------------------------
    # Committing, in batches

    def _hurry(self, change: int) -> None:
        """A sender starts (+1) or stops (-1) waiting for its instances' commit. A sender's
        release waits for it (api/dimse): one that sends an instance an association, as
        modalities do, would otherwise wait out the window for each."""
        with self._waiting_lock:
            self._waiting += change
        if change > 0:
            self._commits.put(_HURRY)  # wakes the committer if it waits for more

    def _commit_loop(self) -> None:
        """Commit what the finishers and retries hand over, as many at a time as arrive within
        COMMIT_WINDOW (up to COMMIT_BATCH; only what has arrived while a sender waits for
        its commit), until close()."""
        while True:
            item = self._commits.get()
            if item is None:
                return
            if item is _HURRY:
                continue
            batch = [cast(tuple[_Ticket, Outcome], item)]
            until = time.monotonic() + COMMIT_WINDOW
            while len(batch) < COMMIT_BATCH:
                try:
                    if self._waiting > 0:
                        more = self._commits.get_nowait()
                    else:
                        more = self._commits.get(timeout=max(0.0, until - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self._commits.put(None)  # stop after this batch
                    break
                if more is not _HURRY:
                    batch.append(cast(tuple[_Ticket, Outcome], more))
            try:
                self._commit(batch)
            except Exception:  # never let the committer die: retried from the originals
                log.exception("committing %d admitted instances failed", len(batch))
                for ticket, _ in batch:
                    self._later(ticket)

    def _commit(self, batch: list[tuple[_Ticket, Outcome]]) -> None:
        """Store and index a batch (the intake's own commit); then finish each instance,
        retry it later, or refuse it."""
        result = BatchResult([outcome for _, outcome in batch])
        if result.stored:
            self.intake.store_batch(result, self.intake.settle_seconds, flush_each=True)
        for (ticket, before), after in zip(batch, result.outcomes, strict=True):
            if isinstance(after, InstanceRecord):
                self._done(ticket, after)
            elif after.code == NOT_AUTHORIZED:  # forgotten meanwhile: the index said so
                self._refuse(ticket, after)
            elif isinstance(before, InstanceRecord):  # the store or the index failed
                self._later(ticket)
            elif after.code == PROCESSING_FAILURE and ticket.failures < WORKER_ATTEMPTS - 1:
                ticket.failures += 1
                self._later(ticket)
            else:
                self._refuse(ticket, after)

    def _done(self, ticket: _Ticket, record: InstanceRecord) -> None:
        """Committed: the pending original becomes the kept one."""
        name, _ = originals.parse_pending_name(ticket.pending.name)
        try:
            if record.original == name:
                self.area.sealer(ticket.group.collection).adopt(ticket.pending)
            else:
                ticket.pending.unlink(missing_ok=True)
        except OSError as e:  # left pending: the next start finds it indexed and finishes
            log.error("pending original of %s not moved: %s", record.sop_uid, type(e).__name__)
        self._settled(ticket, record)

    def _refuse(self, ticket: _Ticket, refusal: Refusal) -> None:
        """Refused after its acknowledgement: its pending original goes, its report says so."""
        _, sop_uid = originals.parse_pending_name(ticket.pending.name)
        log.warning(
            "instance %s, acknowledged on admission, refused: %04X %s",
            sop_uid,
            refusal.code,
            refusal.reason,
        )
        ticket.pending.unlink(missing_ok=True)
        self._settled(ticket, refusal)

    def _settled(self, ticket: _Ticket, outcome: InstanceRecord | Refusal | None) -> None:
        """Count the outcome in its sender's report, or in its submission once written."""
        group = ticket.group
        if not group._finished(outcome) and group.submission_id is not None:
            refused = [_reason_key(outcome)] if isinstance(outcome, Refusal) else []
            series = [outcome.series_uid] if isinstance(outcome, InstanceRecord) else []
            # A recovered sender's report was never written; a live one's counted its
            # instances accepted when they were acknowledged.
            accepted = (1 - len(refused)) if group.recovered else -len(refused)
            try:
                submissions.add_outcomes(
                    self.intake.db_pool,  # type: ignore[arg-type]
                    group.submission_id,
                    accepted=accepted,
                    series=Counter(series),
                    refused=Counter(refused),
                )
            except Exception as e:  # noqa: BLE001 - the instance is settled; the report lags
                log.error("submission %d not updated: %s", group.submission_id, type(e).__name__)
        self.tidy(group)

    def tidy(self, group: Admissions) -> None:
        """Remove a closed sender's directory once nothing of it is pending."""
        if group.idle and not any(p.name != _CONTEXT for p in _entries(group.directory)):
            shutil.rmtree(group.directory, ignore_errors=True)

    # -----------------------------------------------------------------------------------------
    # Retries and recovery

    def _later(self, ticket: _Ticket) -> None:
        """Process the instance again from its pending original, after a back-off."""
        ticket.attempts += 1
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (ticket.attempts - 1))
        _, sop_uid = originals.parse_pending_name(ticket.pending.name)
        log.warning("instance %s: processing again in %.0f s", sop_uid, delay)
        with self._retry_cond:
            ticket.due = time.monotonic() + delay
            heapq.heappush(self._retries, ticket)
            self._retry_cond.notify()

    def _retry_loop(self) -> None:
        while True:
            with self._retry_cond:
                while not self._stopping and (
                    not self._retries or self._retries[0].due > time.monotonic()
                ):
                    wait = self._retries[0].due - time.monotonic() if self._retries else None
                    self._retry_cond.wait(wait)
                if self._stopping:
                    return
                ticket = heapq.heappop(self._retries)
            outcome = self._reprocess(ticket)
            if outcome is not None:
                self._commits.put((ticket, outcome))

    def _reprocess(self, ticket: _Ticket) -> Outcome | None:
        """Process an instance again from its pending original; None if it was indexed
        already (and is now finished), or could not be processed now (the index or store is
        down: later again)."""
        name, sop_uid = originals.parse_pending_name(ticket.pending.name)
        sealer = self.area.sealer(ticket.group.collection)
        if not ticket.pending.exists():  # finished meanwhile (a batch that failed half-way)
            return None
        try:
            if _indexed(self.intake, name):
                sealer.adopt(ticket.pending)
                log.info("instance %s was indexed already", sop_uid)
                self._settled(ticket, None)
                return None
            data = sealer.read_pending(ticket.pending)
            ctx = replace(self.intake.context(ticket.group.collection), originals=None)
            [outcome] = self.intake.run_in_workers(process_part, [(data, ctx)])
        except OriginalUnreadable as e:
            return Refusal(PROCESSING_FAILURE, str(e)[:64])
        except WorkerDied:
            return Refusal(PROCESSING_FAILURE, WORKER_ENDED)
        except Exception as e:  # noqa: BLE001 - the index or store is down: later again
            log.warning("instance %s not processed again: %s", sop_uid, type(e).__name__)
            self._later(ticket)
            return None
        if isinstance(outcome, InstanceRecord):
            kept = name if outcome.sop_uid == sop_uid else sealer.keep(outcome.sop_uid, data)
            outcome = replace(outcome, original=kept)
        return outcome

    def recover(self) -> int:
        """Take over the pending originals of processes that ended and process them now (at
        start-up, before the listener listens); those that fail again are retried in the
        background. The number taken over."""
        for owner in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if owner == self.directory:
                continue
            lock = _try_lock(owner)
            if lock is None:  # a live process's
                continue
            try:
                for sender in _entries(owner):
                    if sender.is_dir():
                        os.rename(sender, self.directory / sender.name)
                shutil.rmtree(owner, ignore_errors=True)
            finally:
                os.close(lock)
        tickets: list[_Ticket] = []
        for sender in _entries(self.directory):
            if not sender.is_dir():
                continue
            try:
                context = json.loads((sender / _CONTEXT).read_text())
            except (OSError, ValueError):
                if not any(p.name != _CONTEXT for p in _entries(sender)):
                    shutil.rmtree(sender, ignore_errors=True)  # cut short as it was made
                else:
                    log.error("pending directory %s has no readable context; left", sender.name)
                continue
            group = Admissions(
                sender, context["collection"], context.get("submission_id"), recovered=True
            )
            group.close()
            for pending in _entries(sender):
                if pending.name != _CONTEXT:
                    group._add()
                    tickets.append(_Ticket(0.0, next(self._seq), pending, group))
            self.tidy(group)
        if tickets:
            log.info("processing %d instances acknowledged before a restart", len(tickets))
        for start in range(0, len(tickets), COMMIT_BATCH):
            chunk = tickets[start : start + COMMIT_BATCH]
            with ThreadPoolExecutor(self.intake.workers) as threads:
                outcomes = list(threads.map(self._reprocess, chunk))
            done = [(t, o) for t, o in zip(chunk, outcomes, strict=True) if o is not None]
            if done:
                self._commit(done)
        return len(tickets)

    def close(self) -> None:
        """Stop: let the instances being processed commit; what is pending stays for the next
        start."""
        self._finishers.shutdown(wait=True)
        self._commits.put(None)
        self._committer.join()
        with self._retry_cond:
            self._stopping = True
            self._retry_cond.notify()
        self._retrier.join()
        if not any(p.is_dir() for p in _entries(self.directory)):
            shutil.rmtree(self.directory, ignore_errors=True)
        os.close(self._lock)


def _reason_key(refusal: Refusal) -> str:
    """A refusal as a submission report counts it: "<status hex> <reason>"."""
    return f"{refusal.code:04X} {refusal.reason}"


def _indexed(intake: Intake, name: str) -> bool:
    """Whether the original of that name is indexed (its instance was committed)."""
    with intake.db_pool.connection() as conn:  # type: ignore[attr-defined]
        row = conn.execute("SELECT 1 FROM originals WHERE name = %s", (name,)).fetchone()
    return row is not None


def _entries(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except FileNotFoundError:
        return []


def _try_lock(directory: Path) -> int | None:
    """An exclusive lock on directory's lock file (a descriptor to close); None if a live
    process holds it."""
    fd = os.open(directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
