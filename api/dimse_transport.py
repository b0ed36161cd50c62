"""The DICOM listener's transport: pynetdicom's threaded server, with the per-message latency of
its acceptor taken out.

pynetdicom 3.0 runs two threads per association that poll: the DUL reader sleeps 1 ms whenever the
socket has nothing to read, and the association's reactor sleeps 1 ms before each look for a
complete DIMSE message. A C-STORE waits for both on the way in and for the DUL again on the way out
(~1.5 ms of a ~5 ms round trip), and every idle association wakes 2,000 times a second, taking the
GIL from the threads that work. Here the DUL waits on its socket and on a wake-up pipe written when
a PDU is handed to it, and the reactor waits on its message queue, woken too when the DUL receives
anything else (a release request); each wakes at least every IDLE_WAIT to check its timers, as the
polling did. pynetdicom reads the socket 4 KiB at a time (128 reads for a 0.5 MB CT); here a PDU is
read in as few reads as the kernel allows, without a second look at the socket (select) or a poll
before each read, and a P-DATA-TF of an established association goes straight to the DIMSE
provider, as the state machine's DT-2 action would take it, without its two queues. A C-STORE
response leaves from the handler's thread when the association is established and nothing is queued
before it, instead of being handed to the DUL's thread (one thread wake-up less per instance).
Requestor associations (C-MOVE to a peer) are pynetdicom's own.

The two loops are pynetdicom 3.0's (`DULServiceProvider.run_reactor`,
`Association._run_reactor`) with only their sleep replaced; the DUL's `_read_pdu_data` and the
DIMSE provider's `receive_primitive` are pynetdicom 3.0's with the fast paths above. pyproject
pins pynetdicom 3.0.x.

The C-STORE response, sent once per instance while the sender waits, is encoded here, and so is
the File Meta Information put in front of a received dataset: pynetdicom builds a pydicom
Dataset for their few elements and encodes it (the response twice), ~0.5 ms per instance
together, a sixth of the listener's own CPU. The C-STORE request's command set is read here
too (pynetdicom converts it through a pydicom Dataset, ~0.15 ms), and a P-DATA-TF PDU's
values are views of the bytes read: pynetdicom copies a 0.5 MB data set four times on its way
in (joining the PDU, decoding it, splitting its items, dropping each item's header byte). The
bytes and primitives are pynetdicom's (tests/test_dimse_transport.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from datetime import datetime
from io import BytesIO
from typing import Any, cast

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, C_STORE, N_EVENT_REPORT, DimseServiceType
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

log = logging.getLogger(__name__)

# Longest an idle thread waits before checking its timers (ARTIM, network timeout) and whether
# it was killed; pynetdicom's polling checked every 1 ms.
IDLE_WAIT = 0.01
# Longest a thread of the listening process holds the GIL while another waits for it (Python's
# default is 5 ms). A sender waits for each C-STORE status, and the threads that read, answer
# and hand instances over each need the GIL briefly, while the committer and the series
# workers of the same process hold it for milliseconds at a time: the status of 1 instance in
# 10 waited 1-2 ms for it. bench/dimse.py, one association, interleaved runs: 194/s against
# 185/s, the same CPU per instance.
SWITCH_INTERVAL = 0.001
# What the listener advertises as its maximum PDU length (PS3.8 9.3.1): senders cut each
# dataset into P-DATA-TF PDUs of at most this (storescu caps its own at 128 KiB), and each PDU
# costs pynetdicom a pass through its state machine.
MAXIMUM_PDU_SIZE = 1 << 20
# Largest single read from a connection.
RECV_SIZE = 1 << 20
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class AcceptorSocket(AssociationSocket):
    """A connection that reads a PDU in as few reads as the kernel allows and acknowledges every
    read at once (Linux TCP_QUICKACK, which the kernel clears again, so it is set after each
    read). A sender with Nagle's algorithm on (dcmtk's storescu, pynetdicom) holds the tail of
    each message until the previous segment is acknowledged; with delayed ACKs that cost ~40 ms
    per C-STORE (19 instances/s)."""

    def recv(self, nr_bytes: int) -> bytearray:
        """Read nr_bytes; fewer only if the peer closed the connection. Memory grows with what
        arrives, never with what the peer declares (a PDU length is the peer's word)."""
        assert self.socket is not None
        # Read straight into the buffer (no bytes object per read to copy again), which is
        # never more than RECV_SIZE ahead of what arrived.
        buffer = bytearray(min(nr_bytes, RECV_SIZE))
        # What has arrived is read in one system call (readv); a socket with a timeout polls
        # before each read (two), which is left for when nothing has arrived yet, and for TLS,
        # whose bytes on the wire are not the PDU's.
        raw = None if isinstance(self.socket, ssl.SSLSocket) else self.socket.fileno()
        got = 0
        while got < nr_bytes:
            if got == len(buffer):
                buffer.extend(bytes(min(nr_bytes - got, RECV_SIZE)))
            with memoryview(buffer) as view:
                n = _read_arrived(raw, view[got:])
                if n is None:
                    n = self.socket.recv_into(view[got:])
            if _TCP_QUICKACK is not None:
                self.socket.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            if not n:  # connection closed: what arrived so far, as pynetdicom returns it
                break
            got += n
        del buffer[got:]
        return buffer


def _read_arrived(fd: int | None, view: memoryview) -> int | None:
    """Bytes read into view from what has arrived on socket fd (None: nothing has, or no fd)."""
    if fd is None:
        return None
    try:
        return os.readv(fd, [view])
    except BlockingIOError:
        return None


# PS3.8 9.3.1: a PDU's header (type, reserved, length), its types, and P-DATA-TF's (9.3.5).
_PDU_HEADER = struct.Struct(">BBL")
_PDU_TYPES = frozenset(range(0x01, 0x08))
_P_DATA_TF = 0x04
_PDV_LENGTH = struct.Struct(">L")


def p_data_tf(body: bytearray | bytes) -> P_DATA_TF:
    """A P-DATA-TF PDU of its body (the bytes after the 6-byte header): its presentation data
    values are views of body. ValueError for an item cut short or of length 0 (pynetdicom's
    decoding raises for both too: the PDU is invalid)."""
    view = memoryview(body)
    pdu = P_DATA_TF()
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise ValueError("presentation data value item header cut short")
        (length,) = _PDV_LENGTH.unpack_from(view, offset)
        end = offset + 4 + length
        if length < 1 or end > len(view):
            raise ValueError("presentation data value item of a wrong length")
        item = PresentationDataValueItem()
        item.presentation_context_id = view[offset + 4]
        item.presentation_data_value = view[offset + 5 : end]  # type: ignore[assignment]
        pdu.presentation_data_value_items.append(item)
        offset = end
    return pdu


class AcceptorDUL(DULServiceProvider):
    """pynetdicom's DICOM Upper Layer provider, waiting for its socket or a PDU to send instead
    of sleeping 1 ms between looks."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # Whole PDUs only: the reactor and send_now never interleave their bytes.
        self._send_lock = threading.Lock()
        # The socket was readable when _wait last returned: no second look (select) first.
        self._readable = False

    def send_pdu(self, primitive: Any) -> None:
        """Queue a primitive to send, and wake the reactor to send it."""
        super().send_pdu(primitive)
        self._wake()

    def send_now(self, primitive: P_DATA) -> None:
        """Send a P-DATA from the calling thread, sparing the hand-over to the reactor, when
        the association is established and nothing waits to go before it (PS3.8 Table 9-10,
        DT-1: a P-DATA request in Sta6 sends a P-DATA-TF and stays there); else queue it."""
        with self._send_lock:
            if self.state_machine.current_state == "Sta6" and self.to_provider_queue.empty():
                super()._send(P_DATA_TF(primitive))
                return
        self.send_pdu(primitive)

    def _send(self, pdu: Any) -> None:
        """Send a PDU whole (see send_now)."""
        with self._send_lock:
            super()._send(pdu)

    def kill_dul(self) -> None:
        """Stop the reactor, now rather than at its next timer check."""
        super().kill_dul()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # already woken (pipe full), or the reactor ended
            self._wake_w.send(b"\0")

    def _wait(self) -> None:
        """Until the peer sent something, a primitive was queued, or IDLE_WAIT passed."""
        sock = self.socket.socket if self.socket is not None else None
        ready: list[Any] = [self._wake_r]
        try:
            if sock is None:
                raise ValueError("no connection")
            ready = select.select([sock, self._wake_r], [], [], IDLE_WAIT)[0]
        except (OSError, ValueError):  # closed: the reactor's next look finds out
            time.sleep(self._run_loop_delay)
        self._readable = sock is not None and sock in ready
        if self._wake_r in ready:
            with contextlib.suppress(OSError):  # drained
                while self._wake_r.recv(4096):
                    pass

    def _process_recv_primitive(self) -> bool:
        """pynetdicom's look for a primitive to send; sending one may close the connection,
        so what _wait saw of the socket is forgotten."""
        if super()._process_recv_primitive():
            self._readable = False
            return True
        return False

    def _is_transport_event(self) -> bool:
        """pynetdicom's look for a PDU to read, without looking again (select) when _wait
        has just seen the socket readable (and nothing was done since)."""
        readable, self._readable = self._readable, False
        connected = self.socket is not None and self.socket.socket is not None
        if readable and connected and self.state_machine.current_state != "Sta13":
            self._read_pdu_data()
            return True
        return bool(super()._is_transport_event())

    def run_reactor(self) -> None:
        """pynetdicom 3.0's DUL loop (dul.py), waiting in _wait where it slept."""
        try:
            self._run()
        finally:
            self._wake_r.close()
            self._wake_w.close()
            self._wake_reactor()  # it ends too once it sees the DUL has

    def _wake_reactor(self) -> None:
        cast(Acceptor, self.assoc).wake()

    def _read_pdu_data(self) -> None:
        """pynetdicom 3.0's _read_pdu_data (dul.py): read a PDU and queue its event and the
        PDU; a P-DATA-TF's values are views of the bytes read, not copies (pynetdicom copies
        each of a C-STORE's 0.5 MB four times: joining, decoding, splitting into values)."""
        assert self.socket is not None
        try:
            header = self.socket.recv(6)
        except (OSError, TimeoutError):
            log.error("Connection closed before the entire PDU was received")
            self.event_queue.put("Evt17")  # transport connection closed
            return
        if len(header) != 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, pdu_length = _PDU_HEADER.unpack(header)
        if pdu_type not in _PDU_TYPES:
            log.error("Unknown PDU type received '0x%02X'", pdu_type)
            self.event_queue.put("Evt19")  # unrecognised or invalid PDU
            return
        try:
            body = self.socket.recv(pdu_length)
        except (OSError, TimeoutError):
            log.error("Connection closed before the entire PDU was received")
            self.event_queue.put("Evt17")
            return
        if len(body) != pdu_length:
            log.error(
                "The received PDU is shorter than expected (%d of %d bytes received)",
                6 + len(body),
                6 + pdu_length,
            )
            self.event_queue.put("Evt17")
            return
        watched = self._watched()
        try:
            if pdu_type == _P_DATA_TF and not watched:
                pdu, event = p_data_tf(body), "Evt10"
            else:  # pynetdicom decodes it, and the handlers bound see its bytes
                pdu, event = self._decode_pdu(header + body)
        except Exception:  # noqa: BLE001 - as pynetdicom: an invalid PDU
            log.error("Unable to decode the received PDU data")
            self.event_queue.put("Evt19")
            return
        if event == "Evt10" and not watched and self._indicate_now():
            # PS3.8 Table 9-10, DT-2: a P-DATA-TF in Sta6 is indicated to the DIMSE provider
            # and the state stays Sta6; what the state machine would do, without its queues.
            try:
                self.assoc.dimse.receive_primitive(pdu.to_primitive())
            except Exception as e:  # noqa: BLE001 - as the state machine: the DUL stops
                log.error("DIMSE failed on a P-DATA-TF, stopping: %s", type(e).__name__)
                self.kill_dul()
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _indicate_now(self) -> bool:
        """Whether a P-DATA-TF just read can go to the DIMSE provider at once: established
        (Sta6), nothing queued before it."""
        return self.state_machine.current_state == "Sta6" and self.event_queue.empty()

    def _watched(self) -> bool:
        """Whether handlers are bound to the events pynetdicom's PDU decoding and state
        machine trigger."""
        assoc = self.assoc
        return bool(
            assoc.get_handlers(evt.EVT_DATA_RECV)
            or assoc.get_handlers(evt.EVT_PDU_RECV)
            or assoc.get_handlers(evt.EVT_FSM_TRANSITION)
        )

    def _run(self) -> None:
        self._idle_timer.start()
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                self._wait()
            if self._kill_thread:
                break
            # The ARTIM timer's event goes ahead of any other this loop.
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                # Either send one queued primitive or read one PDU per loop.
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                # As pynetdicom does: bypass the state machine, send an A-ABORT and stop.
                log.error("DUL reactor failed, aborting the association: %s", type(exc).__name__)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                assert self.socket is not None
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            if event != "Evt10":  # not a P-DATA-TF, which wakes the reactor once a whole
                # DIMSE message is queued: a release or abort request, the connection closed
                self._wake_reactor()
            sleep = False


# PS3.7 Table 9.3-2 (C-STORE-RSP): Command Field, and Command Data Set Type "no data set".
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
# PS3.8 E.2: message control header of a PDV holding a whole command (command, last fragment).
_LAST_COMMAND_FRAGMENT = b"\x03"


def _element(element: int, value: bytes) -> bytes:
    """A command element (group 0000), implicit VR little endian (PS3.7 6.3.1)."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    """A string value padded to even length (PS3.5 6.2: UIDs with NUL, text with space)."""
    data = value.encode("ascii")
    return data + pad if len(data) % 2 else data


def store_response_command(rsp: C_STORE) -> bytes | None:
    """The encoded Command Set of a C-STORE-RSP (PS3.7 9.3.1.2) with Status and at most an
    ASCII Error Comment; None for anything else (pynetdicom encodes those)."""
    if None in (rsp.Status, rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID):
        return None
    if rsp.OffendingElement is not None or not str(rsp.ErrorComment or "").isascii():
        return None
    elements = [
        _element(0x0002, _text(str(rsp.AffectedSOPClassUID), b"\0")),
        _element(0x0100, struct.pack("<H", _C_STORE_RSP)),
        _element(0x0120, struct.pack("<H", rsp.MessageIDBeingRespondedTo)),
        _element(0x0800, struct.pack("<H", _NO_DATA_SET)),
        _element(0x0900, struct.pack("<H", rsp.Status)),
    ]
    if rsp.ErrorComment:
        elements.append(_element(0x0902, _text(str(rsp.ErrorComment), b" ")))
    elements.append(_element(0x1000, _text(str(rsp.AffectedSOPInstanceUID), b"\0")))
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _meta_element(tag: int, vr: bytes, value: bytes) -> bytes:
    """A File Meta Information element, explicit VR little endian (PS3.10 7.1, PS3.5 7.1.2)."""
    if vr == b"OB":  # 2 reserved bytes and a 4-byte length
        return struct.pack("<HH2s2xI", 0x0002, tag, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag, vr, len(value)) + value


def part10(request: C_STORE, transfer_syntax: str) -> bytes | None:
    """A C-STORE request's Data Set as a DICOM file (PS3.10 7.1: preamble, DICM, File Meta
    Information as pynetdicom's Event.encoded_dataset writes it, then the Data Set as
    received); None when a UID is missing or not ASCII (pynetdicom writes those)."""
    uids = (request.AffectedSOPClassUID, request.AffectedSOPInstanceUID, transfer_syntax)
    readable = all(uid and str(uid).isascii() for uid in uids)
    if not readable or not isinstance(request.DataSet, BytesIO):
        return None
    sop_class, sop_instance, syntax = (_text(str(uid), b"\0") for uid in uids)
    elements = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\0\x01"),
            _meta_element(0x0002, b"UI", sop_class),
            _meta_element(0x0003, b"UI", sop_instance),
            _meta_element(0x0010, b"UI", syntax),
            _meta_element(0x0012, b"UI", _text(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
            _meta_element(0x0013, b"SH", _text(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        )
    )
    length = _meta_element(0x0000, b"UL", struct.pack("<I", len(elements)))
    with request.DataSet.getbuffer() as dataset:  # joined without a copy of its own
        return b"".join((bytes(128), b"DICM", length, elements, dataset))


# PS3.7 Table 9.3-1 (C-STORE-RQ): its Command Field, and the elements of its command set with
# their primitive's attribute (None: not one) and kind ("UI", "AE" text or a "US" number).
_C_STORE_RQ = 0x0001
_STORE_REQUEST_ELEMENTS: dict[int, tuple[str | None, str]] = {
    0x0000: (None, "UL"),  # Command Group Length
    0x0002: ("AffectedSOPClassUID", "UI"),
    0x0100: (None, "US"),  # Command Field
    0x0110: ("MessageID", "US"),
    0x0700: ("Priority", "US"),
    0x0800: (None, "US"),  # Command Data Set Type
    0x1000: ("AffectedSOPInstanceUID", "UI"),
    0x1030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x1031: ("MoveOriginatorMessageID", "US"),
}
_ELEMENT_HEADER = struct.Struct("<HHI")


def store_request(command: bytes | bytearray | memoryview, data_set: BytesIO) -> C_STORE | None:
    """The C-STORE primitive of a C-STORE-RQ's encoded command set (implicit VR little endian,
    PS3.7 6.3.1) with data_set, as pynetdicom's message_to_primitive makes it; None for
    anything else or anything unusual (another command, another element, a value of another
    length or not ASCII), which pynetdicom then converts itself. pynetdicom decodes the
    command set into a pydicom Dataset and converts each element (~0.15 ms per instance)."""
    values: dict[int, bytes] = {}
    view = memoryview(command)
    offset = 0
    while offset < len(view):
        if offset + 8 > len(view):
            return None
        group, element, length = _ELEMENT_HEADER.unpack_from(view, offset)
        offset += 8
        if group != 0 or element not in _STORE_REQUEST_ELEMENTS or offset + length > len(view):
            return None
        values[element] = bytes(view[offset : offset + length])
        offset += length
    numbers: dict[int, int] = {}
    for element, value in values.items():
        kind = _STORE_REQUEST_ELEMENTS[element][1]
        if kind in ("US", "UL") and len(value) != (2 if kind == "US" else 4):
            return None
        if kind == "US":
            numbers[element] = int.from_bytes(value, "little")
    if numbers.get(0x0100) != _C_STORE_RQ or numbers.get(0x0800) in (None, _NO_DATA_SET):
        return None
    request = C_STORE()
    try:
        for element, value in values.items():
            keyword, kind = _STORE_REQUEST_ELEMENTS[element]
            if keyword is None:
                continue
            if kind == "US":
                setattr(request, keyword, numbers[element])
                continue
            if not value.isascii() or b"\\" in value:
                return None
            text = value.decode("ascii")
            text = text.rstrip("\0 ") if kind == "UI" else text.strip()  # as pydicom reads them
            if not text:
                return None
            setattr(request, keyword, text)
    except (TypeError, ValueError):
        return None
    request.DataSet = data_set
    return request


class AcceptorDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with C-STORE requests decoded and C-STORE responses
    encoded without pydicom."""

    def receive_primitive(self, primitive: P_DATA) -> None:
        """pynetdicom 3.0's receive_primitive, a C-STORE-RQ converted by store_request()."""
        if self.message is None:
            self.message = DIMSEMessage()
        message = self.message
        if not message.decode_msg(primitive, self.assoc):
            return
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": message})
        context_id = cast(int, message.context_id)
        request = None
        if isinstance(message, C_STORE_RQ) and message._data_set_file is None:
            request = store_request(
                message.encoded_command_set.getbuffer(), cast(BytesIO, message.data_set)
            )
        if request is None:
            try:
                request = message.message_to_primitive()
            except Exception:  # as pynetdicom: the association ends (Evt19)
                log.error("Received an invalid DIMSE message")
                self.dul.event_queue.put("Evt19")
                return
        else:
            request._context_id = context_id
        if isinstance(request, C_CANCEL) and len(self.cancel_req) < 10:
            self.cancel_req[cast(int, request.MessageIDBeingRespondedTo)] = request
        elif isinstance(request, N_EVENT_REPORT) and request.is_valid_request:
            # pynetdicom serves these at once, in a thread of their own
            threading.Thread(
                target=make_target(self.assoc._serve_request), args=(request, context_id)
            ).start()
        else:
            self.msg_queue.put((context_id, cast(DimseServiceType, request)))
        # As pynetdicom does, the message's buffers are let go (its issue #41).
        message.encoded_command_set = BytesIO()
        message.data_set = BytesIO()
        message._data_set_file = None
        message._data_set_path = None
        self.message = None

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send a DIMSE message; a C-STORE-RSP as one PDV of its encoded command set."""
        command = None
        if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:
            command = store_response_command(primitive)
        limit = self.maximum_pdu_size
        if command is None or (limit and len(command) + 6 > limit):  # 6: PDV item header
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, _LAST_COMMAND_FRAGMENT + command))
        cast(AcceptorDUL, self.dul).send_now(pdata)


def _bind_interventions(target: Association | ThreadedAssociationServer) -> None:
    """Bind pynetdicom's default intervention handlers only, where pynetdicom also binds its
    standard notification handlers: those format a debug line for every PDU and DIMSE message
    whatever the log level (~15% of the reading thread's CPU), and Carina keeps pynetdicom's
    log at WARNING anyway."""
    for event in evt._INTERVENTION_EVENTS:
        target.bind(event, evt.get_default_handler(event))


class Acceptor(Association):
    """An acceptor association whose reactor waits for a DIMSE message instead of sleeping
    1 ms before each look, without pynetdicom's logging handlers. Nothing else may call its
    send_* methods from another thread (the C-GET handler sends from the reactor's own
    thread)."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        # Set by wake(), under the message queue's lock: the reactor has something to look at.
        self._woken = False
        self.dul = AcceptorDUL(self)
        self.dimse = AcceptorDIMSE(self)
        # The timeouts pynetdicom set on the DUL it made (ARTIM, idle), on this one.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def _bind_defaults(self) -> None:
        """pynetdicom's default handlers without its logging ones (see _bind_interventions)."""
        _bind_interventions(self)

    def wake(self) -> None:
        """Have the reactor look now: the DUL received what is not a DIMSE message (a
        release request, say: its response would otherwise wait for IDLE_WAIT)."""
        messages = self.dimse.msg_queue
        with messages.not_empty:
            self._woken = True
            messages.not_empty.notify_all()

    def _wait(self) -> None:
        """Until a DIMSE message is queued, wake() was called, or IDLE_WAIT passed."""
        messages = self.dimse.msg_queue
        with messages.not_empty:
            if not messages.queue and not self._woken:
                messages.not_empty.wait(IDLE_WAIT)
            self._woken = False

    def _run_reactor(self) -> None:
        """pynetdicom 3.0's acceptor loop (association.py), waiting in _wait where it slept."""
        self._is_paused = False
        while not self._kill:
            self._wait()
            # Another thread may pause the reactor to use send_* (pynetdicom's checkpoint).
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, context_id)  # type: ignore[arg-type]
            if self.is_established and self.acse.is_release_requested():
                before_release = getattr(self._server, "before_release", None)
                if before_release is not None:
                    before_release(self)
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                log.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class AcceptorRequestHandler(RequestHandler):
    """Makes each incoming connection an Acceptor on an AcceptorSocket (pynetdicom 3.0's
    RequestHandler._create_association, with those two classes, sharing the server's
    presentation contexts)."""

    def _create_association(self) -> Association:
        assoc = Acceptor(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(AcceptorSocket(assoc, client_socket=self.request))
        acceptor = assoc.acceptor
        acceptor.maximum_length = self.ae.maximum_pdu_size
        acceptor.ae_title = self.server.ae_title
        acceptor.address_info = self.local
        acceptor.implementation_class_uid = self.ae.implementation_class_uid
        acceptor.implementation_version_name = self.ae.implementation_version_name
        # pynetdicom deep-copies the server's contexts for each association (~2.5 ms for the
        # listener's ~150); negotiation only reads them (presentation.negotiate_as_acceptor).
        acceptor.supported_contexts = list(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:  # type: ignore[misc]
                    assoc.bind(event, handler, args)
        return assoc


class LowLatencyAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with Acceptor associations, small messages sent at once
    (TCP_NODELAY) and no debug logging handlers. before_release, when set, is called with an
    association whose peer asked to release it, before the release response is sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", AcceptorRequestHandler)
        super().__init__(*args, **kwargs)
        self.before_release: Callable[[Association], None] | None = None

    def _bind_defaults(self) -> None:
        """pynetdicom's default handlers without its logging ones (see _bind_interventions)."""
        _bind_interventions(self)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection and tune it for request/response traffic."""
        sock, address = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address


__all__ = [
    "IDLE_WAIT",
    "MAXIMUM_PDU_SIZE",
    "SWITCH_INTERVAL",
    "AcceptorDUL",
    "AcceptorSocket",
    "LowLatencyAssociationServer",
    "p_data_tf",
    "part10",
    "store_request",
    "store_response_command",
]
