"""The DICOM (DIMSE) listener on pynetdicom: Verification (C-ECHO), Storage (C-STORE) and Study
Root Query/Retrieve (C-FIND, C-MOVE, C-GET) SCP.

Sites push with C-STORE. A calling AE title must be registered (archive/peers) and maps to the
collection its instances go to; an unknown one, or one calling from another host than
registered, is rejected at A-ASSOCIATE time and audited. Each received dataset goes through the
same intake as a STOW-RS part. Its status is sent once it is admitted: checked, and its
original durable in the intake area, the rest following in the background
(curation/admission.py; the release response and the association's end wait for it); or,
with settings.dimse_ack "indexed" and for derived objects, once it is stored and indexed.
pynetdicom runs one thread per association; handlers are plain functions bound to events,
and the only state they share (the table of live associations) sits behind a lock.

The C-STORE handler sees identified data: it logs the calling AE, counts and de-identified UIDs,
never a value from the received dataset.

A registered AE title also queries and retrieves, but only its own collection: C-FIND answers
from PostgreSQL with QIDO-RS's matching (archive/qido), the identifier turned into QIDO
parameters; C-MOVE sends to a move destination registered (with host and port) for the same
collection, over a new association from Carina's AE title; C-GET sends over the requesting
association. What is sent is the de-identified instance as stored, in its stored transfer
syntax."""

from __future__ import annotations

import logging
import socket
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, build_context, evt
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from carina.api.dimse_transport import (
    MAXIMUM_PDU_SIZE,
    SWITCH_INTERVAL,
    LowLatencyAssociationServer,
    part10,
)
from carina.archive import derived, index, peers, qido
from carina.archive.errors import InvalidQuery
from carina.curation.admission import Admissions, Admitted
from carina.curation.intake import (
    CANNOT_UNDERSTAND,
    COERCED,
    DISCARDED,
    DOES_NOT_MATCH,
    NOT_AUTHORIZED,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    IntakeContext,
    Outcome,
    Refusal,
)
from carina.runtime import Runtime

log = logging.getLogger(__name__)

SUCCESS = 0x0000
_WARNING_COMMENT = {
    COERCED: "de-identified (PS3.15 Annex E): attributes changed",
    DISCARDED: "de-identified (PS3.15 Annex E): attributes removed",
}
# PS3.5 Table 6.2-1: ErrorComment is LO, at most 64 characters.
_ERROR_COMMENT_MAX = 64
# Threads, one per association; pynetdicom's default of 10 is low for a site-facing archive.
MAX_ASSOCIATIONS = 64
# Seconds an association's end waits for the instances it had acknowledged on admission to be
# committed or refused before its series are settled and its report written; the release
# response waits at most RELEASE_WAIT of them (senders give up on it after ~30 s).
ADMITTED_WAIT = 60.0
RELEASE_WAIT = 20.0

# Accepted and stored as received (never decompressed): native, deflate and the usual compressed
# syntaxes (PS3.5 Section 10, Annex A).
TRANSFER_SYNTAXES: list[UID] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-permanent, DICOM UL service-user,
# calling-AE-title-not-recognized; rejected-transient, no reason given.
_REJECTED_PERMANENT = 0x01
_REJECTED_TRANSIENT = 0x02
_SERVICE_USER = 0x01
_CALLING_AE_NOT_RECOGNIZED = 0x03
_NO_REASON = 0x01


@dataclass
class _Peer:
    """One accepted association; changed by that association's thread only."""

    ae_title: str
    host: str
    ctx: IntakeContext
    collection: str = ""
    submission_id: int | None = None
    accepted: int = 0
    refused: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    # De-identified Series Instance UID -> instances stored: settled and reported at the end.
    series: Counter[str] = field(default_factory=Counter)
    # Instances acknowledged on admission (settings.dimse_ack "intake"); None: on indexing.
    admissions: Admissions | None = None


class Associations:
    """The live associations of a listener, shared by the handlers of every thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._peers: dict[int, _Peer] = {}

    def put(self, assoc: object, peer: _Peer) -> None:
        """Remember the peer of an association being accepted."""
        with self._lock:
            self._peers[id(assoc)] = peer

    def get(self, assoc: object) -> _Peer | None:
        """The peer of a live association."""
        with self._lock:
            return self._peers.get(id(assoc))

    def pop(self, assoc: object) -> _Peer | None:
        """Forget an association that ended; its peer, the first time only."""
        with self._lock:
            return self._peers.pop(id(assoc), None)


# ---------------------------------------------------------------------------------------------
# Status mapping (the only place that knows both intake refusals and DIMSE statuses)


def store_status(outcome: Outcome | Admitted, warnings: bool) -> Dataset:
    """The C-STORE response status (PS3.4 Annex B.2.3) for an intake outcome; with warnings,
    an instance de-identification changed gets its warning (B.4.1.3: coercion is reported)."""
    status = Dataset()
    if not isinstance(outcome, Refusal):
        status.Status = outcome.warning if warnings else SUCCESS
        if status.Status:
            status.ErrorComment = _WARNING_COMMENT[outcome.warning]
        return status
    status.Status = failure_status(outcome.code)
    # Refusal reasons are Carina's own sentences: they never quote a value of the dataset.
    status.ErrorComment = outcome.reason[:_ERROR_COMMENT_MAX]
    return status


def failure_status(code: int) -> int:
    """The C-STORE failure status for an intake refusal code."""
    if code & 0xF000 == CANNOT_UNDERSTAND:
        return CANNOT_UNDERSTAND
    if code & 0xFF00 == DOES_NOT_MATCH:
        return DOES_NOT_MATCH
    if code & 0xFF00 == OUT_OF_RESOURCES:
        return OUT_OF_RESOURCES
    if code == NOT_AUTHORIZED:
        return NOT_AUTHORIZED
    return PROCESSING_FAILURE


def _host_matches(registered: str, address: str) -> bool:
    """Whether a peer address is the registered host (an address, or a name resolved now)."""
    if registered == address:
        return True
    try:
        infos = socket.getaddrinfo(registered, None)
    except OSError:
        return False
    return any(info[4][0] == address for info in infos)


# ---------------------------------------------------------------------------------------------
# Handlers, bound to pynetdicom events


def handle_requested(event: Event, runtime: Runtime, associations: Associations) -> None:
    """A-ASSOCIATE-RQ: accept registered AE titles calling from their host, reject the rest."""
    assoc = event.assoc
    # The requestor's ae_title is filled in only by negotiation; the A-ASSOCIATE-RQ has it now.
    calling = str(assoc.requestor.primitive.calling_ae_title or "").strip()
    host = str(assoc.requestor.address)
    try:
        ae = peers.get_ae_title(runtime.pool, calling)
    except Exception as e:  # the index is down: ask the peer to try again later
        log.error("association refused: AE title lookup failed: %s", type(e).__name__)
        assoc.acse.send_reject(_REJECTED_TRANSIENT, _SERVICE_USER, _NO_REASON)
        assoc.kill()
        return
    reason = None
    if ae is None:
        reason = "calling AE title not registered"
    elif ae.host and not _host_matches(ae.host, host):
        reason = "calling AE title registered for another host"
    if reason is not None:
        log.warning("association rejected: calling AE %r from %s: %s", calling, host, reason)
        try:
            peers.record_reject(runtime.pool, calling, host, reason)
        except Exception as e:
            log.error("could not audit a rejected association: %s", type(e).__name__)
        assoc.acse.send_reject(_REJECTED_PERMANENT, _SERVICE_USER, _CALLING_AE_NOT_RECOGNIZED)
        # As pynetdicom does for its own rejections: let the DUL send the A-ASSOCIATE-RJ and stop.
        assoc.kill()
        return
    assert ae is not None
    ctx = runtime.intake.context(collection=ae.collection)
    associations.put(assoc, _Peer(ae_title=ae.title, host=host, ctx=ctx, collection=ae.collection))


def handle_accepted(event: Event, runtime: Runtime, associations: Associations) -> None:
    """A-ASSOCIATE-AC sent: open the submission."""
    peer = associations.get(event.assoc)
    if peer is None:
        return
    try:
        peer.submission_id = peers.open_submission(
            runtime.pool, peer.ae_title, peer.host, peer.collection
        )
    except Exception as e:
        log.error("could not record a submission: %s", type(e).__name__)
    if runtime.admitter is not None:
        try:
            peer.admissions = runtime.admitter.open(peer.collection, peer.submission_id)
        except OSError as e:  # its instances are acknowledged once indexed instead
            log.error("could not open the association's pending area: %s", e.strerror)
    log.info(
        "association accepted: AE %s from %s, submission %s",
        peer.ae_title,
        peer.host,
        peer.submission_id,
    )


def handle_ended(event: Event, runtime: Runtime, associations: Associations) -> None:
    """Association released, aborted or its connection closed: close the submission once."""
    peer = associations.pop(event.assoc)
    if peer is None:
        return
    if peer.admissions is not None:
        _settle_admissions(runtime, peer)
    log.info(
        "association of AE %s from %s ended (%s): %d stored, %d refused",
        peer.ae_title,
        peer.host,
        event.event.name,
        peer.accepted,
        peer.refused,
    )
    try:
        runtime.intake.settle(peer.series)  # the sender is done: skip the quiet period
    except Exception as e:  # the quiet period settles them anyway
        log.error("could not settle the association's series: %s", type(e).__name__)
    if peer.submission_id is None:
        return
    try:
        peers.close_submission(
            runtime.pool,
            peer.submission_id,
            accepted=peer.accepted,
            refused=peer.refused,
            reasons=peer.reasons,
            series=peer.series,
        )
    except Exception as e:
        log.error("could not close submission %d: %s", peer.submission_id, type(e).__name__)


def handle_releasing(assoc: object, associations: Associations) -> None:
    """A-RELEASE-RQ received: hold the release response (up to RELEASE_WAIT) until what the
    association had acknowledged on admission is committed, so that a sender whose
    association released normally finds its instances indexed."""
    peer = associations.get(assoc)
    if peer is not None and peer.admissions is not None:
        peer.admissions.wait(RELEASE_WAIT)


def _settle_admissions(runtime: Runtime, peer: _Peer) -> None:
    """Wait (up to ADMITTED_WAIT) for the instances acknowledged on admission, then count
    them in the report: committed ones under their series, refused ones as refused."""
    assert peer.admissions is not None and runtime.admitter is not None
    if not peer.admissions.wait(ADMITTED_WAIT):
        log.warning(
            "association of AE %s ended with instances still being processed: they settle "
            "after the quiet period and are added to submission %s",
            peer.ae_title,
            peer.submission_id,
        )
    series, refusals = peer.admissions.close()
    peer.series.update(series)
    for refusal in refusals:
        peer.accepted -= 1
        peer.refused += 1
        peer.reasons[f"{failure_status(refusal.code):04X} {refusal.reason}"] += 1
    runtime.admitter.tidy(peer.admissions)


def handle_echo(event: Event) -> int:
    """C-ECHO: success (PS3.4 A.4)."""
    return SUCCESS


def handle_store(event: Event, runtime: Runtime, associations: Associations) -> Dataset:
    """C-STORE: the dataset goes through intake; the status says whether it is durable."""
    peer = associations.get(event.assoc)
    try:
        if peer is None:  # only if the association was not accepted through handle_requested
            outcome: Outcome | Admitted = Refusal(PROCESSING_FAILURE, "association not registered")
        else:
            outcome = _store(event, runtime, peer)
    except Exception as e:  # never let one instance take the association down
        log.error("C-STORE failed: %s", type(e).__name__)
        outcome = Refusal(PROCESSING_FAILURE, f"processing failure: {type(e).__name__}")
    status = store_status(outcome, runtime.settings.coercion_warnings)
    if peer is not None:
        if isinstance(outcome, Refusal):
            peer.refused += 1
            peer.reasons[f"{status.Status:04X} {outcome.reason}"] += 1
            log.info(
                "C-STORE from %s refused: %04X %s", peer.ae_title, status.Status, outcome.reason
            )
        else:
            peer.accepted += 1
            if not isinstance(outcome, Admitted):  # those count once committed
                peer.series[outcome.series_uid] += 1
            log.debug("C-STORE from %s stored %s", peer.ae_title, outcome.sop_uid)
    return status


def _store(event: Event, runtime: Runtime, peer: _Peer) -> Outcome | Admitted:
    payload = part10(event.request, event.context.transfer_syntax)
    if payload is None:
        payload = event.encoded_dataset(include_meta=True)
    # PS3.4 B.2.3: a dataset of another SOP Class than the presentation context's does not
    # match: the intake worker checks it as it parses.
    sop_class = str(event.context.abstract_syntax)
    sop_instance = event.request.AffectedSOPInstanceUID
    ctx = replace(
        peer.ctx, sop_class=sop_class, sop_instance=str(sop_instance) if sop_instance else None
    )
    # A derived object's held UIDs are looked up as it is de-identified: acknowledged once
    # indexed, as every instance is with dimse_ack "indexed".
    admitter = runtime.admitter
    if peer.admissions is not None and admitter is not None and sop_class not in derived.KINDS:
        return admitter.admit(payload, ctx, peer.admissions, runtime.settings.coercion_warnings)
    return runtime.intake.ingest_one(payload, ctx)


# ---------------------------------------------------------------------------------------------
# Query/Retrieve (PS3.4 Annex C), Study Root information model

PENDING = 0xFF00
CANCEL = 0xFE00
# PS3.4 C.4.1.1.4 / C.4.2.1.5 / C.4.3.1.4: failure statuses of C-FIND, C-MOVE and C-GET.
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
MOVE_DESTINATION_UNKNOWN = 0xA801  # sent by pynetdicom when handle_move yields (None, None)

# PS3.4 C.6.2.1: Query/Retrieve Level -> QIDO-RS level.
_LEVELS: dict[str, qido.Level] = {"STUDY": "study", "SERIES": "series", "IMAGE": "instance"}
# PS3.4 Table C.6-5..C.6-7: the unique key of each level of the Study Root model.
_UNIQUE_KEYS = {
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
_LEVEL_ORDER = ("STUDY", "SERIES", "IMAGE")
# Keys matched at SERIES and IMAGE level only (as archive/qido refuses them above).
_LOWER_KEYS = {"SERIES": qido.SERIES_KEYS, "IMAGE": qido.INSTANCE_KEYS}
# Elements of an identifier that are not matching keys (PS3.4 C.4.1.1.3.1, C.4.1.2.1).
_NOT_KEYS = {
    Tag(0x0008, 0x0005),  # SpecificCharacterSet
    Tag(0x0008, 0x0052),  # QueryRetrieveLevel
    Tag(0x0008, 0x0054),  # RetrieveAETitle
    Tag(0x0008, 0x0056),  # InstanceAvailability
    Tag(0x0008, 0x0201),  # TimezoneOffsetFromUTC
}
# PS3.8 9.3.2.2: presentation context IDs are the odd numbers 1-255, so 128 at most.
_MAX_PRESENTATION_CONTEXTS = 128
_ANY_DESTINATION_CONTEXTS = [
    build_context(Verification),
    *(
        build_context(cx.abstract_syntax)
        for cx in AllStoragePresentationContexts[: _MAX_PRESENTATION_CONTEXTS - 1]
    ),
]


class IdentifierError(Exception):
    """A C-FIND, C-MOVE or C-GET identifier Carina cannot act on; status and ErrorComment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


def failure(status: int, comment: str) -> Dataset:
    """A failure status with an ErrorComment (Carina's own sentence, never a dataset value)."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return ds


def _text(elem: DataElement) -> str:
    """The matching value of an identifier element as QIDO-RS takes it (values joined by \\)."""
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \0")
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _ae_text(value: object) -> str:
    """An AE title from a DIMSE command (str, or bytes in older pynetdicom), without padding."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()


def _identifier(event: Event) -> Dataset:
    """The request's identifier, or IdentifierError if it cannot be decoded."""
    try:
        identifier = event.identifier
        identifier.get("QueryRetrieveLevel")  # decodes lazily: fail here, not later
    except Exception as e:
        raise IdentifierError(UNABLE_TO_PROCESS, "identifier cannot be decoded") from e
    return identifier


def query_level(identifier: Dataset) -> str:
    """The identifier's Query/Retrieve Level; IdentifierError if missing or not Study Root's."""
    level = _text(identifier["QueryRetrieveLevel"]) if "QueryRetrieveLevel" in identifier else ""
    level = level.upper()
    if level not in _LEVELS:
        # PS3.4 C.6.2.1: Study Root has the STUDY, SERIES and IMAGE levels.
        raise IdentifierError(
            IDENTIFIER_DOES_NOT_MATCH, "QueryRetrieveLevel must be STUDY, SERIES or IMAGE"
        )
    return level


def _uid_list(identifier: Dataset, keyword: str) -> list[str]:
    """The UIDs of a List of UID matching value (PS3.4 C.2.2.2.2); empty if none, or for a
    lone "*" (universal matching, PS3.4 C.2.2.2.3)."""
    if keyword not in identifier:
        return []
    uids = [u.strip() for u in _text(identifier[keyword]).split("\\") if u.strip()]
    return [] if uids == ["*"] else uids


def _single_uid(identifier: Dataset, keyword: str, level: str) -> str:
    """A unique key of a level above the query level: required, one value (PS3.4 C.4.1.3.1.1
    and C.4.2.2.1, hierarchical search and retrieve, the baseline behaviour)."""
    uids = _uid_list(identifier, keyword)
    if len(uids) != 1:
        raise IdentifierError(
            IDENTIFIER_DOES_NOT_MATCH, f"{level} level needs exactly one {keyword}"
        )
    return uids[0]


def find_params(identifier: Dataset, level: str) -> list[tuple[str, str]]:
    """QIDO-RS parameters for a C-FIND identifier: keyword=value for every key, an empty value
    meaning universal matching (PS3.4 C.2.2.2.3), so that it is also returned."""
    below = set()
    for lower in _LEVEL_ORDER[_LEVEL_ORDER.index(level) + 1 :]:
        below |= _LOWER_KEYS[lower]
    params: list[tuple[str, str]] = []
    for elem in identifier:
        tag = elem.tag
        if tag.group in (0x0000, 0x0002) or tag in _NOT_KEYS or tag.is_private:
            continue
        if elem.VR == "SQ":
            continue  # sequence matching is not supported: returned if held, else empty
        value = _text(elem)
        name = elem.keyword or f"{int(tag):08X}"
        if name in below:
            if value:
                # PS3.4 C.4.1.2.1: keys of levels below the Query/Retrieve Level do not belong.
                raise IdentifierError(
                    IDENTIFIER_DOES_NOT_MATCH, f"{name} is below the {level} level"
                )
            continue  # asked for, but not held at this level: returned empty
        params.append((name, value))
    return params


def _visible_studies(runtime: Runtime, collection: str, identifier: Dataset) -> list[str]:
    """The studies of the query that the calling AE may see: those of its collection, among
    the identifier's StudyInstanceUID values if it has any."""
    wanted = _uid_list(identifier, "StudyInstanceUID")
    return index.collection_studies(runtime.pool, collection, wanted or None)


def find_matches(runtime: Runtime, collection: str, identifier: Dataset) -> Iterator[Dataset]:
    """The C-FIND responses' identifiers for a request, every match (no QIDO limit)."""
    level = query_level(identifier)
    # PS3.4 C.4.1.3.1.1: the unique keys of every level above the query level, one value each.
    for upper in _LEVEL_ORDER[: _LEVEL_ORDER.index(level)]:
        _single_uid(identifier, _UNIQUE_KEYS[upper], level)
    params = find_params(identifier, level)
    # Only the caller's collection: its studies become the StudyInstanceUID matching value.
    # Below STUDY level that is the one study of the identifier; at STUDY level it is every
    # study of the collection (or those the identifier lists), one array parameter in SQL.
    studies = _visible_studies(runtime, collection, identifier)
    if not studies:
        return
    params = [(k, v) for k, v in params if k != "StudyInstanceUID"]
    params.append(("StudyInstanceUID", "\\".join(studies)))
    try:
        query = qido.parse_query(_LEVELS[level], params)
    except InvalidQuery as e:
        raise IdentifierError(IDENTIFIER_DOES_NOT_MATCH, str(e)) from e
    query.limit = qido.MAX_LIMIT
    ae_title = runtime.settings.ae_title
    while True:
        try:
            result = qido.search(runtime.pool, query, "")
        except InvalidQuery as e:  # a matching value qido cannot use (a malformed date...)
            raise IdentifierError(UNABLE_TO_PROCESS, str(e)) from e
        for item in result.items:
            yield find_response(identifier, item, level, ae_title)
        if not result.more:
            return
        query.offset += len(result.items)


def find_response(identifier: Dataset, item: dict, level: str, ae_title: str) -> Dataset:
    """The C-FIND response identifier: each key asked for, with the match's value or empty
    (PS3.4 C.4.1.1.3.2), and the Query/Retrieve Level."""
    found = Dataset.from_json({k: v for k, v in item.items() if "BulkDataURI" not in v})
    rsp = Dataset()
    for elem in identifier:
        if elem.tag.group in (0x0000, 0x0002):
            continue
        if elem.tag in found:
            rsp.add(found[elem.tag])
        else:
            rsp.add(DataElement(elem.tag, elem.VR, [] if elem.VR == "SQ" else None))
    if "SpecificCharacterSet" in found:
        rsp.SpecificCharacterSet = found.SpecificCharacterSet
    if "RetrieveAETitle" in identifier:
        rsp.RetrieveAETitle = ae_title
    rsp.QueryRetrieveLevel = level
    return rsp


def handle_find(event: Event, runtime: Runtime, associations: Associations) -> Iterator[Any]:
    """C-FIND (Study Root): a Pending response per match, then Success (PS3.4 C.4.1.3.1)."""
    peer = associations.get(event.assoc)
    if peer is None:
        yield failure(UNABLE_TO_PROCESS, "association not registered"), None
        return
    count = 0
    try:
        identifier = _identifier(event)
        for match in find_matches(runtime, peer.collection, identifier):
            if event.is_cancelled:
                log.info("C-FIND from %s cancelled after %d matches", peer.ae_title, count)
                yield CANCEL, None
                return
            count += 1
            yield PENDING, match
    except IdentifierError as e:
        log.info("C-FIND from %s refused: %04X %s", peer.ae_title, e.status, e.comment)
        yield failure(e.status, e.comment), None
        return
    except Exception as e:
        log.error("C-FIND from %s failed: %s", peer.ae_title, type(e).__name__)
        yield failure(UNABLE_TO_PROCESS, f"processing failure: {type(e).__name__}"), None
        return
    log.info("C-FIND from %s: %d matches", peer.ae_title, count)
    yield SUCCESS, None


def retrieve_set(
    runtime: Runtime, collection: str, identifier: Dataset
) -> list[index.RetrievableInstance]:
    """The instances a C-MOVE or C-GET identifier names, within the caller's collection.
    Baseline retrieve (PS3.4 C.4.2.2.1, C.4.3.2.1): one value for each unique key above the
    level, List of UID matching at the level."""
    level = query_level(identifier)
    keys = [_UNIQUE_KEYS[x] for x in _LEVEL_ORDER[: _LEVEL_ORDER.index(level) + 1]]
    upper = [_single_uid(identifier, k, level) for k in keys[:-1]]
    at_level = _uid_list(identifier, keys[-1])
    if not at_level:
        raise IdentifierError(IDENTIFIER_DOES_NOT_MATCH, f"{level} level needs {keys[-1]}")
    studies = upper[:1] if upper else at_level
    series = (upper[1:2] or None) if level == "IMAGE" else (at_level if level == "SERIES" else None)
    sops = at_level if level == "IMAGE" else None
    return index.retrievable_instances(runtime.pool, collection, studies, series, sops)


def _failed_stub(instance: index.RetrievableInstance) -> Dataset:
    """A dataset pynetdicom cannot send (no transfer syntax): its sub-operation is counted as
    failed, with the instance's UID in the Failed SOP Instance UID List."""
    ds = Dataset()
    ds.SOPClassUID = instance.sop_class_uid
    ds.SOPInstanceUID = instance.sop_uid
    return ds


def _sub_operations(
    event: Event, runtime: Runtime, peer: _Peer, instances: list[index.RetrievableInstance]
) -> Iterator[tuple[int, Dataset | None]]:
    """(Pending, dataset as stored) per instance; Cancel and stop on C-CANCEL."""
    for n, instance in enumerate(instances):
        if event.is_cancelled:
            log.info("retrieve by %s cancelled after %d of %d", peer.ae_title, n, len(instances))
            yield CANCEL, None
            return
        try:
            ds = dcmread(BytesIO(runtime.store.read(instance.object_key)))
        except Exception as e:
            log.error("could not read stored instance %s: %s", instance.sop_uid, type(e).__name__)
            ds = _failed_stub(instance)
        yield PENDING, ds


def storage_contexts(instances: list[index.RetrievableInstance]) -> list[PresentationContext]:
    """One presentation context per (SOP Class, stored transfer syntax): the destination accepts
    or refuses exactly the encoding that will be sent (nothing is transcoded)."""
    pairs = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in instances})
    if len(pairs) > _MAX_PRESENTATION_CONTEXTS:
        log.warning("C-MOVE needs %d presentation contexts; proposing 128", len(pairs))
    return [build_context(sop, ts) for sop, ts in pairs[:_MAX_PRESENTATION_CONTEXTS]]


def handle_move(event: Event, runtime: Runtime, associations: Associations) -> Iterator[Any]:
    """C-MOVE (Study Root): to a move destination registered with host and port for the
    caller's collection; 0xA801 otherwise (PS3.4 C.4.2.1.5)."""
    peer = associations.get(event.assoc)
    destination = _ae_text(event.move_destination)
    try:
        target = peers.get_ae_title(runtime.pool, destination) if peer is not None else None
    except Exception as e:
        log.error("move destination lookup failed: %s", type(e).__name__)
        target = None
    if (
        peer is None
        or target is None
        or not target.host
        or not target.port
        or target.collection != peer.collection
    ):
        log.info(
            "C-MOVE from %s refused: destination %r unknown",
            peer.ae_title if peer else "?",
            destination,
        )
        yield None, None
        return
    try:
        instances = retrieve_set(runtime, peer.collection, _identifier(event))
    except IdentifierError as e:
        log.info("C-MOVE from %s refused: %04X %s", peer.ae_title, e.status, e.comment)
        # pynetdicom takes a status only after the destination and the number of
        # sub-operations: the one announced sub-operation is reported failed. pynetdicom
        # associates with the destination in between, and reports 0xA801 if that fails: so
        # propose what any destination accepts one of (Verification, the storage classes).
        yield target.host, target.port, {"contexts": _ANY_DESTINATION_CONTEXTS}
        yield 1
        yield failure(e.status, e.comment), None
        return
    log.info("C-MOVE from %s to %s: %d instances", peer.ae_title, destination, len(instances))
    yield target.host, target.port, {"contexts": storage_contexts(instances)}
    yield len(instances)
    yield from _sub_operations(event, runtime, peer, instances)


def handle_get(event: Event, runtime: Runtime, associations: Associations) -> Iterator[Any]:
    """C-GET (Study Root): the instances go over the requesting association, in the storage
    contexts it proposed with the SCP role (PS3.4 C.4.3.3.1)."""
    peer = associations.get(event.assoc)
    if peer is None:
        yield 1
        yield failure(UNABLE_TO_PROCESS, "association not registered"), None
        return
    try:
        instances = retrieve_set(runtime, peer.collection, _identifier(event))
    except IdentifierError as e:
        log.info("C-GET from %s refused: %04X %s", peer.ae_title, e.status, e.comment)
        yield 1
        yield failure(e.status, e.comment), None
        return
    log.info("C-GET from %s: %d instances", peer.ae_title, len(instances))
    yield len(instances)
    yield from _sub_operations(event, runtime, peer, instances)


# ---------------------------------------------------------------------------------------------
# The listener


class DimseListener:
    """A pynetdicom AE serving C-ECHO, C-STORE and Study Root C-FIND, C-MOVE and C-GET on
    settings.host:settings.dimse_port."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.associations = Associations()
        self.server: ThreadedAssociationServer | None = None
        settings = runtime.settings
        self.address = (settings.host, settings.dimse_port)
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.maximum_associations = MAX_ASSOCIATIONS
        self.ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
        self.ae.add_supported_context(Verification, TRANSFER_SYNTAXES[:4])
        for model in (
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelMove,
            StudyRootQueryRetrieveInformationModelGet,
        ):
            self.ae.add_supported_context(model, TRANSFER_SYNTAXES[:4])
        # Storage as SCP (C-STORE from sites) and, when a C-GET requestor proposes the SCP role
        # for itself (PS3.7 D.3.3.4, SCP/SCU Role Selection), as SCU over its association.
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(
                cx.abstract_syntax, TRANSFER_SYNTAXES, scu_role=True, scp_role=True
            )
        # pynetdicom logs DIMSE messages (identified UIDs among them) below WARNING.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    def handlers(self) -> list[Any]:
        """The event handlers, each given the runtime and the table of live associations."""
        args = [self.runtime, self.associations]
        return [
            (evt.EVT_REQUESTED, handle_requested, args),
            (evt.EVT_ACCEPTED, handle_accepted, args),
            (evt.EVT_RELEASED, handle_ended, args),
            (evt.EVT_ABORTED, handle_ended, args),
            (evt.EVT_CONN_CLOSE, handle_ended, args),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, args),
            (evt.EVT_C_FIND, handle_find, args),
            (evt.EVT_C_MOVE, handle_move, args),
            (evt.EVT_C_GET, handle_get, args),
        ]

    def start(self) -> None:
        """Listen in background threads; raise OSError if the port cannot be bound. The
        process's GIL switch interval becomes at most SWITCH_INTERVAL."""
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        # What AE.start_server(block=False) does, with our server class (it takes none).
        server = self.ae.make_server(
            self.address, evt_handlers=self.handlers(), server_class=LowLatencyAssociationServer
        )
        server.before_release = partial(handle_releasing, associations=self.associations)
        threading.Thread(target=server.serve_forever, name="dimse-acceptor", daemon=True).start()
        self.ae._servers.append(server)  # so AE.shutdown() stops it too
        self.server = server
        log.info("DICOM listener %s on %s:%d", self.ae.ae_title, self.address[0], self.address[1])

    def stop(self) -> None:
        """Stop listening and end the live associations."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.ae.shutdown()
        log.info("DICOM listener stopped")
