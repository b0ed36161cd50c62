"""The DICOM (DIMSE) listener: Verification (C-ECHO) and Storage (C-STORE) SCP on pynetdicom.

Sites push with C-STORE. A calling AE title must be registered (archive/peers) and maps to the
collection its instances go to; an unknown one, or one calling from another host than
registered, is rejected at A-ASSOCIATE time and audited. Each received dataset goes through the
same intake as a STOW-RS part, and its status is sent only once the instance is stored and
indexed. pynetdicom runs one thread per association; handlers are plain functions bound to
events, and the only state they share (the table of live associations) sits behind a lock.

The C-STORE handler sees identified data: it logs the calling AE, counts and de-identified UIDs,
never a value from the received dataset."""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
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
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from carina.archive import peers
from carina.curation.intake import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    IntakeContext,
    Outcome,
    Refusal,
)
from carina.runtime import Runtime

log = logging.getLogger(__name__)

SUCCESS = 0x0000
# PS3.5 Table 6.2-1: ErrorComment is LO, at most 64 characters.
_ERROR_COMMENT_MAX = 64
# Threads, one per association; pynetdicom's default of 10 is low for a site-facing archive.
MAX_ASSOCIATIONS = 64

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

_SOP_CLASS_UID = 0x00080016


class _QuickAckSocket(socket.socket):
    """A connection that acknowledges every read at once (Linux TCP_QUICKACK, which the kernel
    clears again, so it is set after each read). A sender with Nagle's algorithm on (dcmtk's
    storescu, pynetdicom) holds the tail of each message until the previous segment is
    acknowledged; with delayed ACKs that cost ~40 ms per C-STORE (19 instances/s)."""

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Read, then ask the kernel to acknowledge what came in without delay."""
        data = super().recv(bufsize, flags)
        self.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        return data


_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class LowLatencyAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with small messages sent at once (TCP_NODELAY) and, where
    the platform has it, every read acknowledged at once (TCP_QUICKACK)."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection and tune it for request/response traffic."""
        sock, address = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _TCP_QUICKACK is not None and type(sock) is socket.socket:
            sock = _QuickAckSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        return sock, address


@dataclass
class _Peer:
    """One accepted association; changed by that association's thread only."""

    ae_title: str
    host: str
    ctx: IntakeContext
    submission_id: int | None = None
    accepted: int = 0
    refused: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


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


def store_status(outcome: Outcome) -> Dataset:
    """The C-STORE response status (PS3.4 Annex B.2.3) for an intake outcome."""
    status = Dataset()
    if not isinstance(outcome, Refusal):
        status.Status = SUCCESS
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
    return PROCESSING_FAILURE


def _dataset_sop_class(payload: bytes) -> str | None:
    """The dataset's SOP Class UID read from its first elements, or None if it has none or
    cannot be read (the intake then refuses it with the reason)."""
    try:
        ds = dcmread(BytesIO(payload), stop_before_pixels=True, specific_tags=[_SOP_CLASS_UID])
        value = ds.get("SOPClassUID")
    except Exception:
        return None
    return str(value).strip() if value else None


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
    associations.put(assoc, _Peer(ae_title=ae.title, host=host, ctx=ctx))


def handle_accepted(event: Event, runtime: Runtime, associations: Associations) -> None:
    """A-ASSOCIATE-AC sent: open the submission."""
    peer = associations.get(event.assoc)
    if peer is None:
        return
    try:
        peer.submission_id = peers.open_submission(runtime.pool, peer.ae_title, peer.host)
    except Exception as e:
        log.error("could not record a submission: %s", type(e).__name__)
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
    log.info(
        "association of AE %s from %s ended (%s): %d stored, %d refused",
        peer.ae_title,
        peer.host,
        event.event.name,
        peer.accepted,
        peer.refused,
    )
    if peer.submission_id is None:
        return
    try:
        peers.close_submission(
            runtime.pool,
            peer.submission_id,
            accepted=peer.accepted,
            refused=peer.refused,
            reasons=peer.reasons,
        )
    except Exception as e:
        log.error("could not close submission %d: %s", peer.submission_id, type(e).__name__)


def handle_echo(event: Event) -> int:
    """C-ECHO: success (PS3.4 A.4)."""
    return SUCCESS


def handle_store(event: Event, runtime: Runtime, associations: Associations) -> Dataset:
    """C-STORE: the dataset goes through intake; the status says whether it is durable."""
    peer = associations.get(event.assoc)
    try:
        if peer is None:  # only if the association was not accepted through handle_requested
            outcome: Outcome = Refusal(PROCESSING_FAILURE, "association not registered")
        else:
            outcome = _store(event, runtime, peer)
    except Exception as e:  # never let one instance take the association down
        log.error("C-STORE failed: %s", type(e).__name__)
        outcome = Refusal(PROCESSING_FAILURE, f"processing failure: {type(e).__name__}")
    status = store_status(outcome)
    if peer is not None:
        if isinstance(outcome, Refusal):
            peer.refused += 1
            peer.reasons[f"{status.Status:04X} {outcome.reason}"] += 1
            log.info(
                "C-STORE from %s refused: %04X %s", peer.ae_title, status.Status, outcome.reason
            )
        else:
            peer.accepted += 1
            log.debug("C-STORE from %s stored %s", peer.ae_title, outcome.sop_uid)
    return status


def _store(event: Event, runtime: Runtime, peer: _Peer) -> Outcome:
    payload = event.encoded_dataset(include_meta=True)
    # PS3.4 B.2.3: a dataset of another SOP Class than the presentation context's does not match.
    sop_class = _dataset_sop_class(payload)
    if sop_class is not None and sop_class != str(event.context.abstract_syntax):
        return Refusal(DOES_NOT_MATCH, "SOP Class does not match the presentation context")
    return runtime.intake.ingest_one(payload, peer.ctx)


# ---------------------------------------------------------------------------------------------
# The listener


class DimseListener:
    """A pynetdicom AE serving C-ECHO and C-STORE on settings.host:settings.dimse_port."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.associations = Associations()
        self.server: ThreadedAssociationServer | None = None
        settings = runtime.settings
        self.address = (settings.host, settings.dimse_port)
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.maximum_associations = MAX_ASSOCIATIONS
        self.ae.add_supported_context(Verification, TRANSFER_SYNTAXES[:4])
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
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
        ]

    def start(self) -> None:
        """Listen in background threads; raise OSError if the port cannot be bound."""
        # What AE.start_server(block=False) does, with our server class (it takes none).
        server = self.ae.make_server(
            self.address, evt_handlers=self.handlers(), server_class=LowLatencyAssociationServer
        )
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
