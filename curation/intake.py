"""Intake: every submitted instance (STOW-RS part or C-STORE) goes through here.

parse (header only; pixel bytes copied untouched) -> de-identify -> write the de-identified
Part 10 file to staging -> store it -> index it in one batch per request. Parsing and
de-identification run in a process pool so every core is used."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from io import BytesIO
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

from pydicom import config, dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from carina import __version__
from carina.archive import collections, derived, index, jobs
from carina.archive.errors import OutOfResources
from carina.archive.storage import ObjectStore

from . import part10, rules
from .deid import Deidentifier, load_profile
from .errors import CurationError, InstanceRefused
from .pseudonyms import Pseudonymizer, collection_key, mapped_pseudonymizer
from .rule_settings import RuleSettingError, config_from
from .workers import WorkerDied, WorkerPool

log = logging.getLogger(__name__)

# DICOM failure statuses used by intake (PS3.4 Annex B.2.3, PS3.18 Table 10.5.3-2).
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
# Warning statuses (PS3.4 Table B.2-1): what de-identification did to a stored instance.
COERCED = 0xB000  # Coercion of Data Elements
DISCARDED = 0xB006  # Elements Discarded

# Parts larger than this are spooled to the (restricted) intake area instead of memory.
SPOOL_THRESHOLD = 32 << 20
# A collection's profile is re-read from the database after this many seconds.
PROFILE_TTL = 10.0
# Parts up to this size travel to a worker through a shared-memory slot.
SLOT_SIZE = 8 << 20
# Binary elements above this size are bulk data: left out of the metadata (PS3.18 F.2.6).
BULK_THRESHOLD = 1024
# PS3.7 D.3.3.2: identifies the software that wrote a file (a 2.25 UUID-derived UID).
IMPLEMENTATION_CLASS_UID = "2.25.238593742924346191678535099119690636885"
IMPLEMENTATION_VERSION = f"CARINA_{__version__}"[:16]
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass(frozen=True)
class IntakeContext:
    """What a worker needs to process one part; small and picklable."""

    collection: str
    key: bytes
    profile: str
    options: tuple[str, ...]
    staging_dir: str
    expected_study: str | None = None
    mapping_version: int = 0  # of the collection's pseudonym mapping; 0: it has none
    recipe_lines: tuple[str, ...] = ()  # the collection's own recipe lines
    # The collection's residual-PHI settings; None when that rule is off.
    phi: rules.ResidualPhiSettings | None = None


@dataclass(frozen=True)
class InstanceRecord:
    """A de-identified instance, staged and ready to be stored and indexed."""

    collection: str
    sop_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax_uid: str
    staging_path: str
    size: int
    sha256: str
    instance_number: int | None
    patient: dict[str, str | None]
    study: dict[str, str | None]
    series: dict[str, str | int | None]
    patient_attrs: str
    study_attrs: str
    series_attrs: str
    metadata: str
    # JSON list of rules.PhiHit found with the original identifiers in hand; None: unchecked.
    intake_findings: str | None = None
    warning: int = 0  # COERCED, DISCARDED or 0: what de-identification did to it

    @property
    def object_key(self) -> str:
        """Where the instance lives in the object store."""
        return f"{self.study_uid}/{self.series_uid}/{self.sop_uid}.dcm"


@dataclass(frozen=True)
class Refusal:
    """A part that was not stored, with the DICOM failure code and a reason."""

    code: int
    reason: str
    sop_class_uid: str = ""
    sop_uid: str = ""


Outcome = InstanceRecord | Refusal


@dataclass
class BatchResult:
    """What happened to each part of a request, in order."""

    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def stored(self) -> list[InstanceRecord]:
        """The instances stored and committed."""
        return [o for o in self.outcomes if isinstance(o, InstanceRecord)]

    @property
    def refused(self) -> list[Refusal]:
        """The parts refused."""
        return [o for o in self.outcomes if isinstance(o, Refusal)]


# ---------------------------------------------------------------------------------------------
# Worker side (runs in the process pool)


def _attrs(full: dict, keys: frozenset[str]) -> str:
    return json.dumps({k: v for k, v in full.items() if k in keys}, separators=(",", ":"))


def _str(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _bulk_uri_handler(ds: Dataset) -> Callable[[DataElement], str]:
    """BulkDataURIs relative to the instance's URL (made absolute when served, PS3.18 F.2.6).
    Only top-level elements are addressable as bulkdata/{tag}; a nested one (an icon's pixel
    data, say) gets a URI that answers 404 rather than one that serves another element."""
    top = {id(elem) for elem in ds}

    def uri(elem: DataElement) -> str:
        if id(elem) in top:
            return f"bulkdata/{elem.tag:08X}"
        return f"bulkdata/nested/{elem.tag:08X}"

    return uri


_PIXELS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _check_complete(ds: Dataset) -> None:
    """Refuse images without pixel data, and native pixel data shorter than Rows x Columns x
    samples x frames says (both what a truncated file looks like once parsed)."""
    sop_class = ds.get("SOPClassUID")
    is_image = sop_class is not None and sop_class.name.endswith("Image Storage")
    if is_image and not any(k in ds for k in _PIXELS):
        raise InstanceRefused(CANNOT_UNDERSTAND, "image without pixel data (file truncated?)")
    if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        expected = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel") or 1)
            * frames
            * int(ds.BitsAllocated)
            + 7
        ) // 8
    except (AttributeError, TypeError, ValueError) as e:
        raise InstanceRefused(DOES_NOT_MATCH, "pixel data without a valid image description") from e
    if len(ds.PixelData) < expected:
        raise InstanceRefused(
            CANNOT_UNDERSTAND,
            f"pixel data truncated: {len(ds.PixelData)} bytes, {expected} expected",
        )


def _has_meta_without_preamble(head: bytes) -> bool:
    """File meta (group 0002, explicit VR little endian) with the preamble and DICM left out,
    as dicomweb-client and other writers send it."""
    return head[128:132] != b"DICM" and head[:2] == b"\x02\x00" and head[4:6].isalpha()


def _check_lengths(ds: Dataset, size: int) -> None:
    """pydicom reads a value cut short by the end of the file without complaint, and stops
    quietly on a partial element header; the raw elements' declared lengths and positions say
    whether everything arrived."""
    last = next(reversed(ds._dict.values()), None)
    if isinstance(last, RawDataElement) and last.length != 0xFFFFFFFF:
        end = last.value_tell + last.length
        if end < size:
            raise InstanceRefused(
                CANNOT_UNDERSTAND, f"file truncated or has {size - end} stray bytes at its end"
            )
    for raw in ds._dict.values():
        if isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF:
            value = raw.value
            if value is not None and len(value) != raw.length:
                raise InstanceRefused(
                    CANNOT_UNDERSTAND,
                    f"file truncated: element ({raw.tag.group:04X},{raw.tag.element:04X}) has "
                    f"{len(value)} of {raw.length} bytes",
                )


# Each element as read, with the DataElement its conversion put in the dataset and that
# element's value: an element still holding both after de-identification is unchanged.
Snapshot = dict[int, tuple[RawDataElement, DataElement, object]]


def _read(payload: bytes | bytearray | str) -> tuple[Dataset, Snapshot]:
    """Parse a part and convert every top-level value (so a bad one is refused here), keeping a
    snapshot of the elements as read for the writer (curation/part10)."""
    try:
        if not isinstance(payload, str):
            size = len(payload)
            ds = dcmread(BytesIO(payload), force=_has_meta_without_preamble(payload[:132]))
        else:
            size = os.path.getsize(payload)
            with open(payload, "rb") as f:
                head = f.read(132)
            ds = dcmread(payload, force=_has_meta_without_preamble(head))
        _check_lengths(ds, size)
        raw = {t: e for t, e in ds._dict.items() if isinstance(e, RawDataElement)}
        snapshot: Snapshot = {}
        for elem in ds:  # values are converted lazily: convert them all now
            if elem.tag in raw:
                snapshot[elem.tag] = (raw[elem.tag], elem, elem.value)
    except InvalidDicomError as e:
        raise InstanceRefused(CANNOT_UNDERSTAND, "not a DICOM Part 10 file (no DICM prefix)") from e
    except InstanceRefused:
        raise
    except Exception as e:  # pydicom raises many kinds; all mean the bytes are not readable
        raise InstanceRefused(CANNOT_UNDERSTAND, f"cannot parse DICOM: {type(e).__name__}") from e
    if "TransferSyntaxUID" not in ds.file_meta:
        raise InstanceRefused(CANNOT_UNDERSTAND, "file meta has no TransferSyntaxUID")
    return ds, snapshot


def _unchanged(ds: Dataset, snapshot: Snapshot) -> dict[int, RawDataElement]:
    """The elements of ds that de-identification left as they were read: the same element
    object holding the same value object (it replaces elements, or assigns new values), with
    the VR it was read with (a known attribute sent as UN is written with its own VR). Never
    a sequence: de-identification cleans the items of a sequence in place."""
    current = ds._dict
    return {
        tag: raw
        for tag, (raw, elem, value) in snapshot.items()
        if current.get(tag) is elem
        and elem.value is value
        and elem.VR != "SQ"
        and raw.VR in (None, elem.VR)
    }


def _coercion(ds: Dataset, read: frozenset[int], snapshot: Snapshot) -> int:
    """The warning for what de-identification did to the top-level data set whose tags were
    read: COERCED when it added an attribute or gave one another value, DISCARDED when it only
    removed attributes, 0 when it left them all. Sequence items are cleaned in place, so a
    sequence counts only by its presence."""
    current = ds._dict
    if any(tag not in read for tag in current):
        return COERCED
    for tag, (_, _, value) in snapshot.items():
        if tag in current:
            elem = ds[tag]
            if elem.VR != "SQ" and elem.value is not value and elem.value != value:
                return COERCED
    return DISCARDED if len(current) < len(read) else 0


@dataclass(frozen=True)
class SlotRef:
    """A part's bytes waiting in shared-memory slot `index` (its first `length` bytes)."""

    index: int
    length: int


Payload = bytes | bytearray | str | SlotRef
# Worker side: the intake's shared-memory slots, attached once per worker process, and the
# database URL pseudonym mappings are read from.
_SLOTS: list[shared_memory.SharedMemory] = []
_DATABASE: list[str] = []


@lru_cache(maxsize=64)
def _pseudonymizer(key: bytes, collection: str, mapping_version: int) -> Pseudonymizer:
    """One per collection key and mapping version in each worker, so its UID cache outlives a
    single instance and a mapping is read once per worker, not once per instance."""
    if not mapping_version:
        return Pseudonymizer(key)
    return mapped_pseudonymizer(key, _DATABASE[0], collection)


def process_part(payload: Payload, ctx: IntakeContext) -> Outcome:
    """Parse, check, de-identify and stage one instance: bytes, a shared-memory slot, or the
    path of a spooled file (removed afterwards)."""
    try:
        if isinstance(payload, SlotRef):
            payload = bytes(_SLOTS[payload.index].buf[: payload.length])
        return _process(payload, ctx)
    except InstanceRefused as r:
        return Refusal(r.code, r.reason)
    except Exception as e:  # never let one bad instance take the request down
        # Log the kind of failure only: a message could quote a value from the original.
        log.error("intake failed on one instance: %s", type(e).__name__)
        return Refusal(PROCESSING_FAILURE, f"processing failure: {type(e).__name__}")
    finally:
        if isinstance(payload, str):
            Path(payload).unlink(missing_ok=True)


def _process(payload: bytes | bytearray | str, ctx: IntakeContext) -> Outcome:
    ds, snapshot = _read(payload)
    missing = [k for k in _REQUIRED_UIDS if not _str(ds, k)]
    sop_class = _str(ds, "SOPClassUID") or ""
    original_sop = _str(ds, "SOPInstanceUID") or ""
    if missing:
        return Refusal(
            DOES_NOT_MATCH, "missing required " + ", ".join(missing), sop_class, original_sop
        )
    try:
        _check_complete(ds)
    except InstanceRefused as r:
        return Refusal(r.code, r.reason, sop_class, original_sop)

    pseudo = _pseudonymizer(ctx.key, ctx.collection, ctx.mapping_version)
    if ctx.expected_study is not None:
        original_study = str(ds.StudyInstanceUID)
        if ctx.expected_study not in (original_study, pseudo.uid(original_study)):
            return Refusal(
                DOES_NOT_MATCH,
                "instance belongs to another study than the URL names",
                sop_class,
                original_sop,
            )

    profile = load_profile(ctx.profile, ctx.options, ctx.recipe_lines)
    identifiers = rules.patient_identifiers(ds)  # in memory only, for _residual_phi
    read = frozenset(ds._dict)
    Deidentifier(profile, pseudo).apply(ds)
    warning = _coercion(ds, read, snapshot)

    _prepare_file_meta(ds)
    chunks = part10.encode(ds, _unchanged(ds, snapshot))
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    staging = Path(ctx.staging_dir) / f"{uuid.uuid4().hex}.dcm"
    # Not fsynced here: the store makes a whole batch durable at once before it is indexed.
    with open(staging, "wb") as f:
        f.writelines(chunks)
    try:
        full = ds.to_json_dict(BULK_THRESHOLD, _bulk_uri_handler(ds), suppress_invalid_tags=True)
        findings = _residual_phi(full, identifiers, ctx.phi)
        return _record(ds, ctx, staging, size, digest.hexdigest(), warning, full, findings)
    except Exception:
        staging.unlink(missing_ok=True)
        raise


def _prepare_file_meta(ds: Dataset) -> None:
    """PS3.10 7.1 file meta of the object Carina writes: its own implementation, the remapped
    SOP Instance UID, and a zeroed preamble (a sender's preamble may hold anything, TIFF
    headers included)."""
    meta = ds.file_meta
    meta.FileMetaInformationGroupLength = 0  # recomputed when written
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.preamble = bytes(128)


def _record(
    ds: Dataset,
    ctx: IntakeContext,
    staging: Path,
    size: int,
    sha256: str,
    warning: int,
    full: dict,
    intake_findings: str | None,
) -> InstanceRecord:
    """The index record of a staged instance; full is its DICOM JSON."""
    return InstanceRecord(
        collection=ctx.collection,
        sop_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        series_uid=str(ds.SeriesInstanceUID),
        study_uid=str(ds.StudyInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        staging_path=str(staging),
        size=size,
        sha256=sha256,
        instance_number=_int(ds, "InstanceNumber"),
        patient={
            "patient_id": _str(ds, "PatientID") or "",
            "patient_name": _str(ds, "PatientName"),
            "birth_date": _str(ds, "PatientBirthDate"),
            "sex": _str(ds, "PatientSex"),
        },
        study={
            "study_date": _str(ds, "StudyDate"),
            "study_time": _str(ds, "StudyTime"),
            "accession_number": _str(ds, "AccessionNumber"),
            "study_id": _str(ds, "StudyID"),
            "referring_physician_name": _str(ds, "ReferringPhysicianName"),
            "study_description": _str(ds, "StudyDescription"),
        },
        series={
            "modality": _str(ds, "Modality"),
            "series_number": _int(ds, "SeriesNumber"),
            "series_description": _str(ds, "SeriesDescription"),
            "pps_start_date": _str(ds, "PerformedProcedureStepStartDate"),
            "pps_start_time": _str(ds, "PerformedProcedureStepStartTime"),
        },
        patient_attrs=_attrs(full, index.PATIENT_TAGS),
        study_attrs=_attrs(full, index.STUDY_TAGS),
        series_attrs=_attrs(full, index.SERIES_TAGS),
        metadata=json.dumps(full, separators=(",", ":")),
        warning=warning,
        intake_findings=intake_findings,
    )


def _residual_phi(
    full: dict,
    identifiers: rules.PatientIdentifiers,
    settings: rules.ResidualPhiSettings | None,
) -> str | None:
    """What the de-identified metadata (DICOM JSON) still holds of the original patient's
    identifiers, as JSON; None when the rule is off. Runs in the intake worker, the one place
    the originals exist; only the hits (codes, kinds, attribute paths: no PHI) travel on."""
    if settings is None:
        return None
    return json.dumps(rules.instance_residual_phi(full, identifiers, settings))


def quiet_pydicom() -> None:
    """Keep values of identified originals out of logs: pydicom's validation warnings quote
    the value they complain about (an original UID, say). Carina validates what it relies on
    itself, so pydicom's value validation is off (also ~5% faster), and whatever pydicom still
    warns about stays out of the log."""
    config.settings.reading_validation_mode = config.IGNORE
    config.settings.writing_validation_mode = config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def _warm_up(
    profile: str, options: tuple[str, ...], slot_names: tuple[str, ...], database: str
) -> None:
    quiet_pydicom()
    load_profile(profile, options)
    _SLOTS[:] = [_attach(name) for name in slot_names]
    _DATABASE[:] = [database]


def _attach(name: str) -> shared_memory.SharedMemory:
    """Attach a slot the main process owns (and will unlink) without tracking it here."""
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    except TypeError:  # Python < 3.13 tracks every attachment: undo that
        shm = shared_memory.SharedMemory(name=name)
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return shm


def _ready(hold: float) -> None:
    """Occupy a worker briefly so the pool has to start all of them."""
    time.sleep(hold)


# ---------------------------------------------------------------------------------------------
# Main-process side


class PartSink:
    """Collects one part's bytes: in memory, spilling to the intake area past a threshold."""

    def __init__(self, intake_dir: Path) -> None:
        self._intake_dir = intake_dir
        self._buf = bytearray()
        self._file: tempfile._TemporaryFileWrapper[bytes] | None = None

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes to the part."""
        if self._file is not None:
            self._file.write(data)
            return
        self._buf += data
        if len(self._buf) > SPOOL_THRESHOLD:
            self._file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - handed to the worker
                dir=self._intake_dir, prefix="part-", suffix=".dcm", delete=False
            )
            self._file.write(self._buf)
            self._buf = bytearray()

    def finish(self) -> bytearray | str:
        """The part: its bytes, or the path of the spooled file."""
        if self._file is not None:
            self._file.close()
            return self._file.name
        return self._buf

    def discard(self) -> None:
        """Forget the part (and remove its spool file)."""
        if self._file is not None:
            self._file.close()
            Path(self._file.name).unlink(missing_ok=True)
        self._buf = bytearray()


class Intake:
    """The intake pipeline of one process: a worker pool, the object store and the index."""

    def __init__(
        self,
        *,
        pool: object,
        store: ObjectStore,
        master_key: bytes,
        staging_dir: Path,
        intake_dir: Path,
        workers: int,
        profile: str = "basic",
        options: tuple[str, ...] = (),
        settle_seconds: float = 5.0,
        request_settle_seconds: float = 1.0,
    ) -> None:
        self.db_pool = pool
        self.settle_seconds = settle_seconds
        self.request_settle_seconds = request_settle_seconds
        self.store = store
        self.master_key = master_key
        self.staging_dir = staging_dir
        self.intake_dir = intake_dir
        self.profile = profile
        self.options = options
        self.workers = max(1, workers)
        self._lock = threading.Lock()
        self._since_analyze = 0
        self._collections: dict[str, tuple[float, collections.Collection]] = {}
        quiet_pydicom()  # this process parses too (DIMSE handlers)
        load_profile(profile, options)  # fail at start-up, not on the first instance
        # Parts reach the workers through shared memory (one copy, no pickling through a
        # pipe); each in-flight part holds one slot, so the slots also bound the parts in
        # flight. Small slots: containers often give /dev/shm only 64 MB.
        # STOW requests wait for a slot on the event loop (2 per worker); C-STORE associations,
        # in their own threads, for a worker process of their own (curation/workers) with its
        # slot (as many as the pool has workers).
        stow_slots, dimse_slots = self.workers * 2, self.workers
        self._slots = [
            shared_memory.SharedMemory(create=True, size=SLOT_SIZE)
            for _ in range(stow_slots + dimse_slots)
        ]
        self._free_slots: asyncio.Queue[int] = asyncio.Queue()
        for i in range(stow_slots):
            self._free_slots.put_nowait(i)
        mp_context = multiprocessing.get_context("forkserver")
        initargs = (
            profile,
            options,
            tuple(slot.name for slot in self._slots),
            getattr(pool, "conninfo", ""),
        )
        self.executor = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=mp_context,
            initializer=_warm_up,
            initargs=initargs,
        )
        self._thread_workers = WorkerPool(
            dimse_slots,
            list(range(stow_slots, stow_slots + dimse_slots)),
            mp_context,
            _warm_up,
            initargs,
        )
        # Start every worker now (the pool starts them lazily), so the first request is not
        # the one that pays for process start-up and profile compilation.
        for f in [self.executor.submit(_ready, 0.05) for _ in range(self.workers)]:
            f.result()

    def close(self) -> None:
        """Stop the worker processes and free the shared memory."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        self._thread_workers.close()
        for slot in self._slots:
            slot.close()
            slot.unlink()

    def sink(self) -> PartSink:
        """A new sink for one incoming part."""
        return PartSink(self.intake_dir)

    def context(
        self, collection: str = collections.DEFAULT, expected_study: str | None = None
    ) -> IntakeContext:
        """The worker context for a collection: its own key, de-identification profile and
        options, and residual-PHI settings (NotFound for an unknown collection)."""
        found = self._collection(collection)
        return IntakeContext(
            collection=collection,
            key=collection_key(self.master_key, collection),
            profile=found.deid_profile,
            options=found.options,
            staging_dir=str(self.staging_dir),
            expected_study=expected_study,
            mapping_version=found.mapping_version,
            recipe_lines=found.recipe_lines,
            phi=_phi_settings(found.rules),
        )

    def _collection(self, name: str) -> collections.Collection:
        """A collection as stored, read at most every PROFILE_TTL seconds."""
        now = time.monotonic()
        with self._lock:
            cached = self._collections.get(name)
        if cached is not None and now - cached[0] < PROFILE_TTL:
            return cached[1]
        found = collections.get(self.db_pool, name)  # type: ignore[arg-type]
        # A broken profile fails here, early.
        load_profile(found.deid_profile, found.options, found.recipe_lines)
        with self._lock:
            self._collections[name] = (now, found)
        return found

    def settle(self, series_uids: Iterable[str]) -> None:
        """The sender is done with these series (its association ended): evaluate them now."""
        jobs.settle(self.db_pool, series_uids)  # type: ignore[arg-type]

    async def ingest(
        self, payloads: AsyncIterator[bytes | bytearray | str | Refusal], ctx: IntakeContext
    ) -> BatchResult:
        """Process every payload; store and index the good ones in one batch; keep the order.

        A payload may already be a Refusal (e.g. a part of the wrong media type)."""
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Future[Outcome]] = []

        async def run(payload: Payload, slot: int) -> Outcome:
            try:
                return await loop.run_in_executor(self.executor, process_part, payload, ctx)
            finally:
                self._free_slots.put_nowait(slot)

        try:
            async for payload in payloads:
                if isinstance(payload, Refusal):
                    done: asyncio.Future[Outcome] = loop.create_future()
                    done.set_result(payload)
                    tasks.append(done)
                    continue
                slot = await self._free_slots.get()
                work = self._into_slot(payload, slot)
                tasks.append(asyncio.ensure_future(run(work, slot)))
        finally:
            outcomes = list(await asyncio.gather(*tasks))
        result = BatchResult(outcomes)
        if result.stored:
            # One request is one batch. Its series are judged after a short quiet period, which
            # the next request of an upload in many pushes back: judged once, not every time.
            await asyncio.to_thread(self._commit, result, self.request_settle_seconds)
        return result

    def _into_slot(self, payload: bytearray | bytes | str, slot: int) -> Payload:
        """The payload a worker gets: the part copied into slot when it fits, else as it is
        (a spooled file's path, or bytes pickled through the pool's pipe)."""
        if isinstance(payload, str) or len(payload) > SLOT_SIZE:
            return payload
        self._slots[slot].buf[: len(payload)] = payload
        return SlotRef(slot, len(payload))

    def ingest_one(self, payload: bytes, ctx: IntakeContext) -> Outcome:
        """Process, store and index one instance (a C-STORE); return once it is durable or
        refused. Blocking and thread-safe: each caller waits for its own worker and commit.
        The instance reaches the worker through a shared-memory slot, as a STOW part does."""
        with self._thread_workers.worker() as (slot, worker):
            try:
                outcome = worker.call(process_part, self._into_slot(payload, slot), ctx)
            except WorkerDied:
                outcome = Refusal(PROCESSING_FAILURE, "processing failure: worker ended")
        result = BatchResult([outcome])
        if result.stored:
            # More may follow on the association: settle after a quiet period or at its end.
            self._commit(result, self.settle_seconds)
        return result.outcomes[0]

    def _commit(self, result: BatchResult, settle_after: float) -> None:
        """Move staged files into the store (durable as a batch), then index them in one
        transaction, their series incoming and due for evaluation settle_after seconds from
        now; only what is both stored and indexed is acknowledged."""
        positions = [i for i, o in enumerate(result.outcomes) if isinstance(o, InstanceRecord)]
        records: list[InstanceRecord] = [result.outcomes[i] for i in positions]  # type: ignore[misc]
        errors = self.store.put_files([(r.object_key, Path(r.staging_path)) for r in records])
        stored: list[InstanceRecord] = []
        for i, record, error in zip(positions, records, errors, strict=True):
            if error is None:
                stored.append(record)
                continue
            Path(record.staging_path).unlink(missing_ok=True)
            code = OUT_OF_RESOURCES if isinstance(error, OutOfResources) else PROCESSING_FAILURE
            result.outcomes[i] = _refused(record, code, str(error))
        if not stored:
            return
        try:
            index.write_batch(self.db_pool, stored, settle_after)  # type: ignore[arg-type]
        except Exception as e:  # the index is down: nothing of this batch is acknowledged
            log.exception("index write failed for %d instances", len(stored))
            failed = {id(r) for r in stored}
            for i, outcome in enumerate(result.outcomes):
                if id(outcome) in failed:
                    result.outcomes[i] = _refused(
                        outcome,  # type: ignore[arg-type]
                        PROCESSING_FAILURE,
                        f"index unavailable: {type(e).__name__}",
                    )
            return
        try:
            derived.index_batch(self.db_pool, self.store, stored)  # type: ignore[arg-type]
        except Exception as e:  # derived indexes serve search only: never fail the ingest
            log.warning("derived-object indexing failed: %s", type(e).__name__)
        log.info("stored %d instances", len(stored))
        self._refresh_statistics(len(stored))

    def _refresh_statistics(self, added: int) -> None:
        """After every index.ANALYZE_EVERY new instances, ANALYZE in the background."""
        with self._lock:
            self._since_analyze += added
            if self._since_analyze < index.ANALYZE_EVERY:
                return
            self._since_analyze = 0
        threading.Thread(target=self._analyze, name="analyze", daemon=True).start()

    def _analyze(self) -> None:
        try:
            index.analyze(self.db_pool)  # type: ignore[arg-type]
        except Exception as e:  # statistics are an optimisation; never fail intake for them
            log.warning("ANALYZE failed: %s", type(e).__name__)


def _phi_settings(overrides: dict) -> rules.ResidualPhiSettings | None:
    """A collection's residual-PHI settings for the intake worker; None when the rule is off.
    Settings that no longer parse fall back to the defaults (the series job says so)."""
    try:
        config = config_from(overrides)
    except RuleSettingError:
        config = rules.RulesConfig()
    return config.residual_phi if config.residual_phi.enabled else None


def _refused(record: InstanceRecord, code: int, reason: str) -> Refusal:
    return Refusal(code, reason, record.sop_class_uid, record.sop_uid)


__all__ = [
    "BatchResult",
    "CurationError",
    "InstanceRecord",
    "Intake",
    "IntakeContext",
    "PartSink",
    "Refusal",
    "process_part",
]
