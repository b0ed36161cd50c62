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
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from io import BytesIO
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Any

from pydicom import config, dcmread
from pydicom.charset import default_encoding
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.hooks import hooks
from pydicom.hooks import raw_element_value as _default_value_hook
from pydicom.hooks import raw_element_vr as _default_vr_hook
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import IS, DSfloat

from carina import __version__
from carina.archive import collections, derived, erasure, index, jobs, originals
from carina.archive.errors import OutOfResources
from carina.archive.storage import ObjectStore, start_writeback

from . import part10, rules
from .deid import UID as UID_OP
from .deid import Deidentifier, Profile, load_profile, subject_key
from .errors import CurationError, InstanceRefused
from .pseudonyms import Pseudonymizer, collection_key, mapped_pseudonymizer
from .rule_settings import RuleSettingError, config_from
from .workers import Interim, LoopWorkerPool, Worker, WorkerDied, WorkerPool, tell

log = logging.getLogger(__name__)

# DICOM failure statuses used by intake (PS3.4 Annex B.2.3, PS3.18 Table 10.5.3-2).
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
# PS3.7 Annex C general status Refused: Not Authorized: an instance of a forgotten subject.
NOT_AUTHORIZED = 0x0124
# Short enough for a C-STORE ErrorComment (LO, 64 characters); quotes no identifier.
FORGOTTEN = "subject forgotten (erased): refused until an admin allows it"
# The reason given for a part whose worker process ended while on it (killed, out of memory).
WORKER_ENDED = "processing failure: worker ended"
# Warning statuses (PS3.4 Table B.2-1): what de-identification did to a stored instance.
COERCED = 0xB000  # Coercion of Data Elements
DISCARDED = 0xB006  # Elements Discarded

# A collection's profile is re-read from the database after this many seconds.
PROFILE_TTL = 10.0
# Seconds a collection seen without erasures in force is taken to have none (_refuse_forgotten).
ERASURES_TTL = 5.0
# Parts up to this size travel to a worker through a shared-memory slot; larger ones are
# spooled to the (restricted) intake area as they arrive, and the worker reads the file.
SLOT_SIZE = 8 << 20
SPOOL_THRESHOLD = SLOT_SIZE
# Binary elements above this size are bulk data: left out of the metadata (PS3.18 F.2.6).
BULK_THRESHOLD = 1024
# PS3.7 D.3.3.2: identifies the software that wrote a file (a 2.25 UUID-derived UID).
IMPLEMENTATION_CLASS_UID = "2.25.238593742924346191678535099119690636885"
IMPLEMENTATION_VERSION = f"CARINA_{__version__}"[:16]
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_SOP_INSTANCE_UID = 0x00080018
_SERIES_INSTANCE_UID = 0x0020000E


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
    # Keeps the identified original, encrypted (archive/originals.py); None: not kept.
    originals: originals.Sealer | None = None
    # Admit early (curation/admission.py): tell() the caller an Admission before
    # de-identifying, naming this pending original (archive/originals.Sealer.write_pending),
    # which the caller writes meanwhile and which becomes the kept original; None: do not.
    pending: str | None = None
    # The SOP Class the instance must have (a C-STORE's presentation context's); None: any.
    sop_class: str | None = None
    # The SOP Instance UID its C-STORE request names (Affected SOP Instance UID): the pending
    # original's name holds its pseudonym. Without it, no early admission.
    sop_instance: str | None = None
    # The Admission carries de-identification's warning (the status does): told once
    # de-identified, unless the profile remaps SOP Instance UIDs (then always COERCED).
    admit_with_warning: bool = False
    # Start writing the staged file to disk as soon as it is written (start_writeback): the
    # committer of early admissions flushes its batch file by file before indexing it, and
    # a batch written out then, file after file, held up the senders' flushes of their
    # pending originals and their releases (curation/admission.py).
    write_back: bool = False


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
    original: str | None = None  # file name of its kept original (archive/originals.py)
    # Keyed digests that recognise the instance's subject among erasures (never stored).
    forgotten_marks: tuple[bytes, ...] = ()

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


@dataclass(frozen=True)
class Admission:
    """An instance parsed and checked, told by the worker before it goes on; its original is
    the pending original at pending, which the caller (curation/admission.py) makes durable
    meanwhile. Nothing in it is identified: the UIDs are the de-identified ones."""

    collection: str
    sop_class_uid: str
    sop_uid: str
    series_uid: str
    pending: str  # path of the pending original
    warning: int = 0  # what de-identification did, when told after it (admit_with_warning)
    # Keyed digests that recognise the instance's subject among erasures (never stored).
    forgotten_marks: tuple[bytes, ...] = ()


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


def _value(ds: Dataset, keyword: str) -> object:
    """ds.get(keyword) for a top-level attribute, without Dataset's attribute machinery."""
    elem = ds._dict.get(tag_for_keyword(keyword))  # type: ignore[arg-type]
    if elem is None:
        return None
    if isinstance(elem, RawDataElement):
        elem = ds[elem.tag]
    return elem.value


def _str(ds: Dataset, keyword: str) -> str | None:
    value = _value(ds, keyword)
    if value is None or value == "":
        return None
    return str(value)


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = _value(ds, keyword)
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _bulk_uri_handler(ds: Dataset) -> Callable[[DataElement], str]:
    """BulkDataURIs relative to the instance's URL (made absolute when served, PS3.18 F.2.6).
    Only top-level elements are addressable as bulkdata/{tag}; a nested one (an icon's pixel
    data, say) gets a URI that answers 404 rather than one that serves another element."""
    top = {id(elem) for elem in ds._dict.values()}

    def uri(elem: DataElement) -> str:
        if id(elem) in top:
            return f"bulkdata/{elem.tag:08X}"
        return f"bulkdata/nested/{elem.tag:08X}"

    return uri


def _same(value: object) -> object:
    return value


# VRs whose single value pydicom's to_json_dict gives as [convert(value)]: (type, convert).
_SINGLE_JSON: dict[str, tuple[type, Callable[[Any], object]]] = {
    **dict.fromkeys(("AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM"), (str, _same)),
    **dict.fromkeys(("UC", "UR", "UT"), (str, _same)),
    "UI": (UID, _same),
    "IS": (IS, int),
    "DS": (DSfloat, float),
    **dict.fromkeys(("SL", "SS", "SV", "UL", "US", "UV"), (int, _same)),
    **dict.fromkeys(("FD", "FL"), (float, _same)),
}


def dicom_json(ds: Dataset) -> dict:
    """The PS3.18 Annex F DICOM JSON of a de-identified ds with bulk data left out, exactly as
    pydicom's Dataset.to_json_dict (suppress_invalid_tags) gives it. The common case, one text
    or binary-number value, is written here directly (pydicom spends ~7 us on each element);
    every other element goes through pydicom's own DataElement.to_json_dict."""
    uri = _bulk_uri_handler(ds)
    out: dict[str, dict] = {}
    with config.strict_reading():
        for tag, elem in ds._dict.items():
            try:
                if isinstance(elem, RawDataElement):
                    elem = ds[tag]
                vr, value = elem.VR, elem.value
                single = _SINGLE_JSON.get(vr)
                if single is not None and type(value) is single[0]:
                    out[f"{tag:08X}"] = (
                        {"vr": vr, "Value": [single[1](value)]} if value != "" else {"vr": vr}
                    )
                else:
                    out[f"{tag:08X}"] = elem.to_json_dict(uri, BULK_THRESHOLD)
            except Exception:  # as suppress_invalid_tags: an unencodable element is left out
                continue
    return out


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
        snapshot = _convert_all(ds)
    except InvalidDicomError as e:
        raise InstanceRefused(CANNOT_UNDERSTAND, "not a DICOM Part 10 file (no DICM prefix)") from e
    except InstanceRefused:
        raise
    except Exception as e:  # pydicom raises many kinds; all mean the bytes are not readable
        raise InstanceRefused(CANNOT_UNDERSTAND, f"cannot parse DICOM: {type(e).__name__}") from e
    if "TransferSyntaxUID" not in ds.file_meta:
        raise InstanceRefused(CANNOT_UNDERSTAND, "file meta has no TransferSyntaxUID")
    return ds, snapshot


# Explicit VRs whose raw elements convert without what Dataset.__getitem__ adds around
# pydicom's conversion (a sequence's pixel representation, an ambiguous or UN VR's resolution,
# a private element's creator): those take the __getitem__ path.
_PLAIN_VRS = frozenset(
    {
        "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD",
        "OF", "OL", "OV", "OW", "PN", "SH", "SL", "SS", "ST", "SV", "TM", "UC", "UI", "UL",
        "UR", "US", "UT", "UV",
    }
)  # fmt: skip
_CHARSET_TAG = 0x00080005


def _convert_all(ds: Dataset) -> Snapshot:
    """Convert every top-level value of a freshly read ds (pydicom converts lazily, and a bad
    value must be refused now) and snapshot each element as read. Plain elements go straight
    through pydicom's convert_raw_data_element with the character set looked up once, as
    Dataset.__getitem__ would convert them (it looks the character set up per element and
    stores the result through __setitem__'s checks: most of intake's parse time)."""
    elements = ds._dict
    charset = ds.original_character_set or ds._character_set
    snapshot: Snapshot = {}
    for tag, raw in list(elements.items()):
        if not isinstance(raw, RawDataElement):
            continue
        if (
            raw.VR in _PLAIN_VRS
            and raw.value is not None
            and tag != _CHARSET_TAG
            and not tag >> 16 & 1  # private
        ):
            elem = _ascii_element(raw)
            if elem is None:
                elem = convert_raw_data_element(raw, encoding=charset, ds=ds)
            elements[tag] = elem
        else:
            elem = ds[tag]
        snapshot[tag] = (raw, elem, elem.value)
    return snapshot


# VRs whose values pydicom decodes as the default character set whatever the data set's, and
# splits at backslashes (pydicom.values.convert_string and convert_UI), when it converts dates
# and times to str (config.datetime_conversion off, its default).
_ASCII_VRS = frozenset({"AS", "CS", "DA", "DT", "TM", "UI"})


def _ascii_element(raw: RawDataElement) -> DataElement | None:
    """raw converted as pydicom's default hooks convert it, for the plain string VRs (most of
    a header's elements; ~1 us instead of ~7); None for any other, or when pydicom's
    conversion is configured otherwise."""
    if (
        raw.VR not in _ASCII_VRS
        or not raw.length
        or config.datetime_conversion
        or config.data_element_callback
        or hooks.raw_element_kwargs
        or hooks.raw_element_vr is not _default_vr_hook
        or hooks.raw_element_value is not _default_value_hook
    ):
        return None
    text = raw.value.decode(default_encoding)  # type: ignore[union-attr]
    if raw.VR == "UI":
        text = text.rstrip("\0 ")
    items = text.rstrip(" \x00").split("\\")
    kind = UID if raw.VR == "UI" else str
    value = kind(items[0]) if len(items) == 1 else MultiValue(kind, items)
    return DataElement(
        raw.tag, raw.VR, value, raw.value_tell, raw.length == 0xFFFFFFFF, already_converted=True
    )


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
        return _process_part(payload, ctx)
    except InstanceRefused as r:
        return Refusal(r.code, r.reason)
    except Exception as e:  # never let one bad instance take the request down
        # Log the kind of failure only: a message could quote a value from the original.
        log.error("intake failed on one instance: %s", type(e).__name__)
        return Refusal(PROCESSING_FAILURE, f"processing failure: {type(e).__name__}")
    finally:
        if isinstance(payload, str):
            Path(payload).unlink(missing_ok=True)


def _process_part(payload: bytes | bytearray | str, ctx: IntakeContext) -> Outcome:
    ds, snapshot = _read(payload)
    missing = [k for k in _REQUIRED_UIDS if not _str(ds, k)]
    sop_class = _str(ds, "SOPClassUID") or ""
    original_sop = _str(ds, "SOPInstanceUID") or ""
    if ctx.sop_class is not None and sop_class and sop_class != ctx.sop_class:
        # PS3.4 B.2.3: a data set of another SOP Class than its presentation context's.
        return Refusal(
            DOES_NOT_MATCH,
            "SOP Class does not match the presentation context",
            sop_class,
            original_sop,
        )
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
    admission = None
    told = False
    if ctx.pending is not None and sop_class not in derived.KINDS:
        admission = _admission(ds, ctx, pseudo, profile, ctx.pending)
        if not ctx.admit_with_warning or _remaps_sop_uid(profile):
            # The warning is known already: a remapped SOP Instance UID is a changed value.
            tell(replace(admission, warning=COERCED) if ctx.admit_with_warning else admission)
            told = True
    held: set[str] = set()
    if sop_class in derived.KINDS and _DATABASE:
        # A derived object made from what Carina published (a SEG of a published CT) names
        # UIDs Carina wrote: kept as they are, so its references land on the published series.
        held = index.held_uids(_DATABASE[0], ctx.collection, _uids_in(ds))
        pseudo = pseudo.keeping(held)
    identifiers = rules.patient_identifiers(ds)  # in memory only, for _residual_phi
    original_id = _str(ds, "PatientID")
    read = frozenset(ds._dict)
    Deidentifier(profile, pseudo).apply(ds)
    if str(ds.StudyInstanceUID) in held:
        # Filed in the held study: under its patient and study attributes as Carina holds
        # them, not those the object carries (pseudonyms mapped again, dates shifted again).
        _file_under(ds, index.study_attributes(_DATABASE[0], str(ds.StudyInstanceUID)))
        # The patient's pseudonyms the object carried are Carina's, not the patient's PHI.
        identifiers = identifiers.without(rules.patient_identifiers(ds))
    marks = (pseudo.forgotten_research_id(_str(ds, "PatientID") or ""),)
    if original_id:
        marks += (pseudo.forgotten_original(pseudo.subject_digest(original_id)),)
    warning = _coercion(ds, read, snapshot)
    if admission is not None and not told:
        tell(replace(admission, warning=warning))

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
        if ctx.write_back:
            f.flush()
            start_writeback(f.fileno())
    try:
        full = dicom_json(ds)
        findings = _residual_phi(full, identifiers, ctx.phi)
        record = instance_record(
            ds, ctx, staging, size, digest.hexdigest(), warning, full, findings
        )
        record = replace(record, forgotten_marks=marks)
        name, sealed_for = (
            originals.parse_pending_name(Path(admission.pending).name) if admission else ("", "")
        )
        if sealed_for == record.sop_uid:
            # Its pending original becomes the kept one (the seal names this SOP Instance UID).
            record = replace(record, original=name)
        elif ctx.originals is not None:  # from here, where the identified bytes already are
            record = replace(record, original=ctx.originals.keep(record.sop_uid, payload))
        return record
    except Exception:
        staging.unlink(missing_ok=True)
        raise


def _remaps(profile: Profile, tag: int) -> bool:
    """Whether de-identification gives every instance (but a derived object's held UIDs,
    never admitted early) a new UID at tag, its pseudonym."""
    rule = profile.rule_for(tag)
    return rule is not None and rule.op == UID_OP


def _remaps_sop_uid(profile: Profile) -> bool:
    """Whether every instance gets a new SOP Instance UID: then it always coerces
    (_coercion)."""
    return _remaps(profile, _SOP_INSTANCE_UID)


def _given_uid(profile: Profile, pseudo: Pseudonymizer, tag: int, uid: str) -> str:
    """The UID de-identification gives an instance's UID at tag: its pseudonym where the
    profile remaps it, itself where the profile keeps it (the Retain UIDs Option)."""
    return pseudo.uid(uid) if _remaps(profile, tag) else uid


def deidentified_sop_uid(ctx: IntakeContext) -> str:
    """The SOP Instance UID de-identification will give the instance a C-STORE names
    (ctx.sop_instance), which its pending original is named and sealed for. Should a recipe
    give another, the worker keeps the original again under the UID it gave (process_part)."""
    assert ctx.sop_instance is not None
    profile = load_profile(ctx.profile, ctx.options, ctx.recipe_lines)
    # A collection's pseudonym mapping maps subjects, never UIDs: the unmapped pseudonymizer's.
    uids = _pseudonymizer(ctx.key, ctx.collection, 0)
    return _given_uid(profile, uids, _SOP_INSTANCE_UID, ctx.sop_instance)


def _admission(
    ds: Dataset, ctx: IntakeContext, pseudo: Pseudonymizer, profile: Profile, pending: str
) -> Admission:
    """The Admission of a parsed and checked instance whose pending original is at pending
    (its caller makes it durable). Its forgotten marks are those de-identification gives
    (PatientID is always its pseudonym)."""
    original_id = _str(ds, "PatientID")
    marks = (pseudo.forgotten_research_id(pseudo.patient_id(subject_key(ds))),)
    if original_id:
        marks += (pseudo.forgotten_original(pseudo.subject_digest(original_id)),)
    return Admission(
        collection=ctx.collection,
        sop_class_uid=str(ds.SOPClassUID),
        sop_uid=_given_uid(profile, pseudo, _SOP_INSTANCE_UID, str(ds.SOPInstanceUID)),
        series_uid=_given_uid(profile, pseudo, _SERIES_INSTANCE_UID, str(ds.SeriesInstanceUID)),
        pending=pending,
        forgotten_marks=marks,
    )


def _uids_in(ds: Dataset) -> list[str]:
    """Every UID value in ds, nested sequences included."""
    found: list[str] = []
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.value:
            values = elem.value if isinstance(elem.value, list | tuple) else [elem.value]
            found += [str(v).strip().rstrip("\x00") for v in values]
    return list(dict.fromkeys(found))


def _file_under(ds: Dataset, attributes: dict[str, Any]) -> None:
    """Replace ds's patient and study attributes with attributes (DICOM JSON)."""
    for tag in index.PATIENT_TAGS | index.STUDY_TAGS:
        if int(tag, 16) in ds:
            del ds[int(tag, 16)]
    ds.update(Dataset.from_json(attributes))


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


def instance_record(
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
        # Views of the request's own chunks, joined once at the end: growing one buffer chunk
        # by chunk copied a large part several times over.
        self._pieces: list[bytes | memoryview] = []
        self._size = 0
        self._file: tempfile._TemporaryFileWrapper[bytes] | None = None

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes to the part."""
        if self._file is not None:
            self._file.write(data)
            return
        if not (isinstance(data, memoryview) and isinstance(data.obj, bytes)):
            data = bytes(data)  # not a view of immutable bytes: the caller may reuse it
        self._pieces.append(data)
        self._size += len(data)
        if self._size > SPOOL_THRESHOLD:
            self._file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - handed to the worker
                dir=self._intake_dir, prefix="part-", suffix=".dcm", delete=False
            )
            self._file.writelines(self._pieces)
            self._pieces = []

    def finish(self) -> bytes | str:
        """The part: its bytes, or the path of the spooled file."""
        if self._file is not None:
            self._file.close()
            return self._file.name
        return b"".join(self._pieces)

    def discard(self) -> None:
        """Forget the part (and remove its spool file)."""
        if self._file is not None:
            self._file.close()
            Path(self._file.name).unlink(missing_ok=True)
        self._pieces = []


class Told:
    """What a thread worker told first of an instance it goes on processing (an Admission),
    and the worker, until outcome() has the rest."""

    def __init__(self, value: Any, pool: WorkerPool, taken: tuple[int, Worker]) -> None:
        self.value = value
        self._pool = pool
        self._taken: tuple[int, Worker] | None = taken

    def outcome(self) -> Outcome:
        """The instance's outcome, once the worker has it; the worker is free again after
        (WorkerDied if it ended first). Once only."""
        assert self._taken is not None, "outcome() already taken"
        taken, self._taken = self._taken, None
        try:
            return taken[1].receive()
        finally:
            self._pool.give_back(taken)


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
        originals_area: originals.Area | None = None,
    ) -> None:
        self.db_pool = pool
        self.settle_seconds = settle_seconds
        self.request_settle_seconds = request_settle_seconds
        self.store = store
        self.master_key = master_key
        self.staging_dir = staging_dir
        self.intake_dir = intake_dir
        self.originals = originals_area
        self.profile = profile
        self.options = options
        self.workers = max(1, workers)
        self._lock = threading.Lock()
        self._since_analyze = 0
        self._collections: dict[str, tuple[float, collections.Collection]] = {}
        # Collection -> when it was last seen without erasures in force (_refuse_forgotten).
        self._erasure_free: dict[str, float] = {}
        quiet_pydicom()  # this process parses too (DIMSE handlers)
        load_profile(profile, options)  # fail at start-up, not on the first instance
        # Parts reach the workers through shared memory (one copy, no pickling through a
        # pipe); each in-flight part holds one slot, so the slots also bound the parts in
        # flight. Small slots: containers often give /dev/shm only 64 MB.
        # STOW requests, on the event loop, take a slot of a worker that holds two tasks at a
        # time (curation/workers LoopWorkerPool); C-STORE associations, in their own threads,
        # a worker process of their own with its slot (as many as the pool has workers).
        stow_slots, dimse_slots = self.workers * 2, self.workers
        self._slots = [
            shared_memory.SharedMemory(create=True, size=SLOT_SIZE)
            for _ in range(stow_slots + dimse_slots)
        ]
        mp_context = multiprocessing.get_context("forkserver")
        # Workers fork from a server that has imported intake already: a worker starts (and
        # one that died is replaced) without importing pydicom and the rest again.
        mp_context.set_forkserver_preload([__name__])
        initargs = (
            profile,
            options,
            tuple(slot.name for slot in self._slots),
            getattr(pool, "conninfo", ""),
        )
        self._stow_workers = LoopWorkerPool(
            self.workers, list(range(stow_slots)), mp_context, _warm_up, initargs
        )
        self._thread_workers = WorkerPool(
            dimse_slots,
            list(range(stow_slots, stow_slots + dimse_slots)),
            mp_context,
            _warm_up,
            initargs,
        )
        # Wait for the STOW workers' warm-up now, so the first request is not the one that
        # pays for process start-up and profile compilation.
        self._stow_workers.call_blocking(_ready, 0.0)

    def close(self) -> None:
        """Stop the worker processes and free the shared memory."""
        self._stow_workers.close()
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
            originals=self.originals.sealer(collection) if self.originals else None,
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
        tasks: list[asyncio.Future[Outcome]] = []
        try:
            async for payload in payloads:
                if isinstance(payload, Refusal):
                    done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
                    done.set_result(payload)
                    tasks.append(done)
                    continue
                if not isinstance(payload, str) and len(payload) > SLOT_SIZE:
                    payload = await asyncio.to_thread(self._spool, payload)
                lease = await self._stow_workers.take()
                work = self._into_slot(payload, lease[1])
                tasks.append(self._stow_workers.submit(lease, process_part, work, ctx))
        finally:
            outcomes = [await _outcome(task) for task in tasks]
        result = BatchResult(outcomes)
        if result.stored:
            # One request is one batch. Its series are judged after a short quiet period, which
            # the next request of an upload in many pushes back: judged once, not every time.
            await asyncio.to_thread(self._commit, result, self.request_settle_seconds)
        return result

    def _spool(self, payload: bytes | bytearray) -> str:
        """Write a part too large for a slot to the intake area; the worker removes it."""
        with tempfile.NamedTemporaryFile(
            dir=self.intake_dir, prefix="part-", suffix=".dcm", delete=False
        ) as f:
            f.write(payload)
            return f.name

    def _into_slot(self, payload: bytearray | bytes | str, slot: int) -> Payload:
        """The payload a worker gets: the part copied into slot when it fits, else as it is
        (a spooled file's path, or bytes pickled through the worker's pipe)."""
        if isinstance(payload, str) or len(payload) > SLOT_SIZE:
            return payload
        self._slots[slot].buf[: len(payload)] = payload
        return SlotRef(slot, len(payload))

    def run_in_workers(self, fn: Callable[..., Outcome], calls: list[tuple[Any, ...]]) -> list:
        """fn(*args) for each args of calls in the worker processes, in parallel, blocking;
        the results in order (a reprocessing's instances)."""

        def one(args: tuple[Any, ...]) -> Outcome:
            with self._thread_workers.worker() as (_, worker):
                return worker.call(fn, *args)

        with ThreadPoolExecutor(self.workers) as threads:
            return list(threads.map(one, calls))

    def ingest_one(self, payload: bytes, ctx: IntakeContext) -> Outcome:
        """Process, store and index one instance (a C-STORE); return once it is durable or
        refused. Blocking and thread-safe: each caller waits for its own worker and commit.
        The instance reaches the worker through a shared-memory slot, as a STOW part does."""
        try:
            outcome = self.start_one(payload, ctx)
        except WorkerDied:
            outcome = Refusal(PROCESSING_FAILURE, WORKER_ENDED)
        assert not isinstance(outcome, Told), "admitted early: Admitter.admit commits it"
        return self.commit_one(outcome)

    def start_one(
        self, payload: bytes, ctx: IntakeContext, meanwhile: Callable[[], None] | None = None
    ) -> Outcome | Told:
        """Process one instance in a thread worker (through its shared-memory slot) up to what
        the worker tells first (tell()): a Told, whose outcome() follows; or, if it told
        nothing, the outcome, not yet stored (commit_one). WorkerDied if the worker ended.
        meanwhile (which must not raise), if given, is called once: while the worker parses,
        or before, if every worker is busy (instead of waiting idle for one)."""
        taken = self._thread_workers.take(wait=meanwhile is None)
        if taken is None:
            assert meanwhile is not None
            meanwhile()
            meanwhile = None
            taken = self._thread_workers.take()
            assert taken is not None
        try:
            first = taken[1].call(
                process_part, self._into_slot(payload, taken[0]), ctx, meanwhile=meanwhile
            )
        except BaseException:
            self._thread_workers.give_back(taken)
            raise
        if not isinstance(first, Interim):
            self._thread_workers.give_back(taken)
            return first
        return Told(first.value, self._thread_workers, taken)

    def commit_one(self, outcome: Outcome) -> Outcome:
        """Store and index one processed instance (a refusal stays one); what became of it.
        More may follow from its sender: its series settles after a quiet period, or at the
        end of its association."""
        result = BatchResult([outcome])
        if result.stored:
            self._commit(result, self.settle_seconds)
        return result.outcomes[0]

    def store_batch(
        self, result: BatchResult, settle_after: float, flush_each: bool = False
    ) -> None:
        """Store and index the staged instances of result as intake does (a reprocessing's,
        or a batch of instances admitted early: nobody waits for it, so flush_each, see
        ObjectStore.put_files)."""
        self._commit(result, settle_after, flush_each)

    def _commit(self, result: BatchResult, settle_after: float, flush_each: bool = False) -> None:
        """Move staged files into the store (durable as a batch), then index them in one
        transaction, their series incoming and due for evaluation settle_after seconds from
        now; only what is both stored and indexed is acknowledged."""
        self._refuse_forgotten(result)
        positions = [i for i, o in enumerate(result.outcomes) if isinstance(o, InstanceRecord)]
        records: list[InstanceRecord] = [result.outcomes[i] for i in positions]  # type: ignore[misc]
        errors = self.store.put_files(
            [(r.object_key, Path(r.staging_path)) for r in records], flush_each
        )
        stored: list[InstanceRecord] = []
        for i, record, error in zip(positions, records, errors, strict=True):
            if error is None:
                stored.append(record)
                continue
            self.discard(record)
            code = OUT_OF_RESOURCES if isinstance(error, OutOfResources) else PROCESSING_FAILURE
            result.outcomes[i] = _refused(record, code, str(error))
        if not stored:
            return
        try:
            stored = self._index(result, stored, settle_after)
        except Exception as e:  # the index is down: nothing of this batch is acknowledged
            log.exception("index write failed for %d instances", len(stored))
            failed = {id(r) for r in stored}
            for i, outcome in enumerate(result.outcomes):
                if id(outcome) in failed:
                    self.discard(outcome)  # type: ignore[arg-type]
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

    def discard(self, record: InstanceRecord) -> None:
        """Remove what intake wrote for an instance it refuses after all: its staged file and
        its kept original (a forgotten subject's above all)."""
        Path(record.staging_path).unlink(missing_ok=True)
        if record.original and self.originals is not None:
            originals.path(self.originals.root, record.original).unlink(missing_ok=True)

    def _refuse_forgotten(self, result: BatchResult) -> None:
        """Refuse the instances of result whose subject an erasure in force forgot (see
        forgotten())."""
        try:
            forgotten = self.forgotten(result.stored)
        except Exception:  # noqa: BLE001 - the index transaction checks again, or fails
            return
        for i, outcome in enumerate(result.outcomes):
            if isinstance(outcome, InstanceRecord) and not forgotten.isdisjoint(
                outcome.forgotten_marks
            ):
                self.discard(outcome)
                result.outcomes[i] = _refused(outcome, NOT_AUTHORIZED, FORGOTTEN)

    def forgotten(self, items: Sequence[InstanceRecord | Admission]) -> set[bytes]:
        """The forgotten marks of items that an erasure in force of their collection holds. A
        collection seen without erasures in force less than ERASURES_TTL seconds ago is not
        asked again (no round trip): an erasure made meanwhile is caught by the index
        transaction (_admit_records), which refuses the instance and deletes its object."""
        now = time.monotonic()
        items = [
            r
            for r in items
            if now - self._erasure_free.get(r.collection, -ERASURES_TTL) >= ERASURES_TTL
        ]
        if not items:
            return set()
        with self.db_pool.connection() as conn, conn.cursor() as cur:  # type: ignore[attr-defined]
            for collection in {r.collection for r in items}:
                if not erasure.any_in_force(cur, collection):
                    self._erasure_free[collection] = now
            items = [r for r in items if self._erasure_free.get(r.collection) != now]
            return _forgotten_marks(cur, items)

    def _index(
        self, result: BatchResult, stored: list[InstanceRecord], settle_after: float
    ) -> list[InstanceRecord]:
        """Index stored in one transaction that an erasure of their collection cannot overlap
        (archive/erasure.py); those whose subject an erasure forgot meanwhile are refused and
        their objects deleted. Returns what was indexed."""
        while stored:
            try:
                guard = partial(_admit_records, stored)
                index.write_batch(self.db_pool, stored, settle_after, guard=guard)  # type: ignore[arg-type]
                return stored
            except _ForgottenMeanwhile as e:
                refused = {id(r) for r in stored if not e.marks.isdisjoint(r.forgotten_marks)}
                for record in stored:  # their collections have erasures in force after all
                    self._erasure_free.pop(record.collection, None)
                for i, outcome in enumerate(result.outcomes):
                    if id(outcome) in refused:
                        self.store.delete(outcome.object_key)  # type: ignore[union-attr]
                        self.discard(outcome)  # type: ignore[arg-type]
                        result.outcomes[i] = _refused(outcome, NOT_AUTHORIZED, FORGOTTEN)  # type: ignore[arg-type]
                stored = [r for r in stored if id(r) not in refused]
        return stored

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


class _ForgottenMeanwhile(Exception):
    """An erasure forgot the subject of an instance between its check and its indexing."""

    def __init__(self, marks: set[bytes]) -> None:
        super().__init__("subject forgotten meanwhile")
        self.marks = marks


def _admit_records(records: list[InstanceRecord], cur: Any) -> None:
    """In the transaction that indexes records: hold off erasures of their collections, then
    check again that none of their subjects is forgotten (_ForgottenMeanwhile if one is)."""
    for collection in sorted({r.collection for r in records}):
        erasure.hold_off(cur, collection)
    forgotten = _forgotten_marks(cur, records)
    if forgotten:
        raise _ForgottenMeanwhile(forgotten)


def _forgotten_marks(cur: Any, records: Sequence[InstanceRecord | Admission]) -> set[bytes]:
    """The forgotten marks of records that an erasure in force of their collection holds."""
    found: set[bytes] = set()
    for collection in sorted({r.collection for r in records}):
        marks = {m for r in records if r.collection == collection for m in r.forgotten_marks}
        found |= erasure.in_force(cur, collection, sorted(marks))
    return found


async def _outcome(task: asyncio.Future[Outcome]) -> Outcome:
    """A part's outcome: a worker that ended while on it refuses that part only."""
    try:
        return await task
    except WorkerDied:
        return Refusal(PROCESSING_FAILURE, WORKER_ENDED)


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
