"""The DICOM listener's transport (api/dimse_transport): pynetdicom's acceptor without polling,
driven by real pynetdicom and dcmtk peers over loopback."""

from __future__ import annotations

import os
import resource
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.events import Event
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from carina.api import dimse_transport
from carina.api.dimse_transport import (
    IDLE_WAIT,
    MAXIMUM_PDU_SIZE,
    AcceptorDUL,
    AcceptorSocket,
    LowLatencyAssociationServer,
    p_data_tf,
    part10,
    store_request,
    store_response_command,
)
from tests.factory import Phi, ct_instance, to_bytes

# An idle thread of a polling acceptor wakes ~1,000 times a second (pynetdicom sleeps 1 ms);
# one that waits wakes at most 1 / IDLE_WAIT times (100), plus what it is sent.
IDLE_SWITCHES_PER_SECOND = 2 / IDLE_WAIT


class Scp:
    """An in-process storage SCP on a given server class, keeping what it receives."""

    def __init__(self, server_class: type[ThreadedAssociationServer]) -> None:
        self.received: list[bytes] = []
        self.ae = AE(ae_title="SCP")
        self.ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
        self.ae.add_supported_context(Verification)
        self.ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        self.server = self.ae.make_server(
            ("127.0.0.1", 0),
            evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0), (evt.EVT_C_STORE, self._store)],
            server_class=server_class,
        )
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.ae._servers.append(self.server)  # as DimseListener does, so AE.shutdown() stops it
        self.port = int(self.server.server_address[1])

    def _store(self, event: Event) -> int:
        self.received.append(event.encoded_dataset(include_meta=True))
        return 0

    def stop(self) -> None:
        """Stop the server and its associations."""
        self.ae.shutdown()


@pytest.fixture
def scp() -> Iterator[Scp]:
    """An SCP on Carina's listener transport."""
    s = Scp(LowLatencyAssociationServer)
    yield s
    s.stop()


def voluntary_switches(native_id: int) -> int:
    """How many times a thread of this process has given up the CPU to wait (Linux)."""
    status = Path(f"/proc/self/task/{native_id}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("voluntary_ctxt_switches"))
    return int(line.split()[1])


def test_idle_association_threads_wait_instead_of_polling(scp: Scp) -> None:
    scu = AE(ae_title="SCU")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", scp.port, ae_title="SCP")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        (acceptor,) = scp.server.active_associations
        threads = {"reactor": acceptor.native_id, "DUL": acceptor.dul.native_id}
        before = {name: voluntary_switches(tid) for name, tid in threads.items()}
        start = time.monotonic()
        time.sleep(1.0)
        seconds = time.monotonic() - start
        for name, tid in threads.items():
            rate = (voluntary_switches(tid) - before[name]) / seconds
            assert rate < IDLE_SWITCHES_PER_SECOND, f"{name} thread woke {rate:.0f} times/s"
        # Still answering at once after the idle second.
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()


def test_pynetdicom_sends_a_ct_in_one_pdu_and_it_arrives_intact(scp: Scp) -> None:
    ds = ct_instance(Phi(), 1, rows=512, columns=512, seed=1)
    sent = to_bytes(ds)
    pdus: list[int] = []
    scu = AE(ae_title="SCU")
    scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = scu.associate(
        "127.0.0.1",
        scp.port,
        ae_title="SCP",
        evt_handlers=[(evt.EVT_PDU_SENT, lambda e: pdus.append(len(e.pdu)))],
    )
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == MAXIMUM_PDU_SIZE
    pdus.clear()
    status = assoc.send_c_store(dcmread(BytesIO(sent)))
    sent_pdus = list(pdus)
    assoc.release()
    assert status.Status == 0
    # One P-DATA-TF for the command, one for the whole 0.5 MB dataset (16 KiB PDUs: 33).
    assert len(sent_pdus) == 2, sent_pdus
    (got,) = scp.received
    assert dcmread(BytesIO(got)).PixelData == ds.PixelData


def test_storescu_round_trips_many_instances_over_one_association(scp: Scp, tmp_path: Path) -> None:
    phi = Phi()
    files = []
    for n in range(20):
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(to_bytes(ct_instance(phi, n + 1, rows=256, columns=256, seed=n)))
        files.append(path)
    done = subprocess.run(
        ["storescu", "-aet", "SCU", "-aec", "SCP", "127.0.0.1", str(scp.port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert len(scp.received) == 20
    sent = {dcmread(f).SOPInstanceUID for f in files}
    got = {dcmread(BytesIO(b)).SOPInstanceUID for b in scp.received}
    assert got == sent


def test_a_declared_pdu_length_is_not_allocated_before_it_arrives(scp: Scp) -> None:
    # An unauthenticated peer declares a 512 MiB A-ASSOCIATE-RQ and sends 10 bytes of it.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with socket.create_connection(("127.0.0.1", scp.port)) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 512 << 20) + bytes(10))
        time.sleep(0.5)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 << 10, f"{grown_kib} KiB"
    scu = AE(ae_title="SCU")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", scp.port, ae_title="SCP")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()


def _pynetdicom_store_response(rsp: C_STORE) -> bytes:
    """The command set of a C-STORE-RSP as pynetdicom encodes it (its one PDV, header off)."""
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = message.encode_msg(1, MAXIMUM_PDU_SIZE)
    ((_, pdv),) = pdata.presentation_data_value_list
    assert pdv[:1] == b"\x03"  # one command fragment, the last
    return pdv[1:]


@pytest.mark.parametrize(
    ("status", "comment", "sop_uid"),
    [
        (0x0000, None, "1.2.826.0.1.3680043.8.498.1"),  # odd length UID: NUL padded
        (0xB000, "de-identified (PS3.15 Annex E): attributes changed", "1.2.3.44"),
        (0xB006, "odd length comment", "1.2.3.4"),
        (0xA900, "SOP Class does not match the presentation context", "2.25.1234"),
        (0x0124, "subject forgotten (erased): refused until an admin allows it", "1.2.3"),
    ],
)
def test_store_response_is_encoded_as_pynetdicom_encodes_it(
    status: int, comment: str | None, sop_uid: str
) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 0x1234
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = sop_uid
    rsp.Status = status
    rsp.ErrorComment = comment
    encoded = store_response_command(rsp)
    assert encoded == _pynetdicom_store_response(rsp)
    decoded = read_dataset(BytesIO(encoded), is_implicit_VR=True, is_little_endian=True)
    assert decoded.Status == status and decoded.AffectedSOPInstanceUID == sop_uid


def _store_request(sop_uid: str, priority: int) -> C_STORE:
    """A C-STORE request primitive for a CT instance."""
    request = C_STORE()
    request.MessageID = 0x1234
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = sop_uid
    request.Priority = priority
    request.DataSet = BytesIO(b"\0" * 8)
    return request


def _store_request_command(request: C_STORE) -> bytes:
    """The command set of a C-STORE-RQ as pynetdicom encodes it."""
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return encode(message.command_set, True, True)


def _pynetdicom_store_request(command: bytes, data_set: BytesIO) -> C_STORE:
    """The primitive pynetdicom makes of a C-STORE-RQ's command set."""
    message = C_STORE_RQ()
    message.command_set = decode(BytesIO(command), True, True)
    message.data_set = data_set
    message.context_id = 3
    primitive = message.message_to_primitive()
    assert isinstance(primitive, C_STORE)
    return primitive


_REQUEST_FIELDS = (
    "MessageID",
    "AffectedSOPClassUID",
    "AffectedSOPInstanceUID",
    "Priority",
    "MoveOriginatorApplicationEntityTitle",
    "MoveOriginatorMessageID",
)


@pytest.mark.parametrize(
    ("sop_uid", "priority", "originator"),
    [
        ("1.2.826.0.1.3680043.8.498.1", 2, None),  # odd length UID: NUL padded
        ("1.2.3.44", 0, None),
        ("2.25.1234", 1, ("MOVER ", 17)),  # a C-MOVE's sub-operation, AE space padded
        ("1.2.3", 2, ("A", 65535)),
    ],
)
def test_store_request_is_read_as_pynetdicom_reads_it(
    sop_uid: str, priority: int, originator: tuple[str, int] | None
) -> None:
    request = _store_request(sop_uid, priority)
    if originator is not None:
        request.MoveOriginatorApplicationEntityTitle = originator[0]
        request.MoveOriginatorMessageID = originator[1]
    command = _store_request_command(request)
    data_set = BytesIO(b"data")
    ours = store_request(command, data_set)
    theirs = _pynetdicom_store_request(command, data_set)
    assert ours is not None and ours.DataSet is data_set
    for field in _REQUEST_FIELDS:
        assert getattr(ours, field) == getattr(theirs, field), field
        assert type(getattr(ours, field)) is type(getattr(theirs, field)), field
    assert ours.AffectedSOPInstanceUID == sop_uid


def test_unusual_store_requests_are_left_to_pynetdicom() -> None:
    command = _store_request_command(_store_request("1.2.3", 2))
    assert store_request(command, BytesIO()) is not None
    header = struct.Struct("<HHI")

    def element(tag: int, value: bytes) -> bytes:
        return header.pack(0, tag, len(value)) + value

    # An element a C-STORE-RQ does not have, a cut element, a multi-valued or non-ASCII UID,
    # a number of another length, no data set, another command.
    assert store_request(command + element(0x0902, b"comment "), BytesIO()) is None
    assert store_request(command[:-3], BytesIO()) is None
    assert store_request(command + b"\0\0", BytesIO()) is None
    for tag, value in [
        (0x1000, b"1.2.3\\1.2.4"),
        (0x1000, "1.2.\u00e9".encode("latin-1")),
        (0x0110, b"\x01\x00\x00\x00"),
        (0x0800, b"\x01\x01"),
        (0x0100, b"\x01\x80"),
    ]:
        changed = _replace_element(command, tag, value)
        assert store_request(changed, BytesIO()) is None, (tag, value)


def _replace_element(command: bytes, tag: int, value: bytes) -> bytes:
    """command with element (0000,tag)'s value replaced (the group length left as it was)."""
    out = b""
    offset = 0
    while offset < len(command):
        group, element, length = struct.unpack_from("<HHI", command, offset)
        old = command[offset + 8 : offset + 8 + length]
        out += struct.pack("<HHI", group, element, len(value) if element == tag else length)
        out += value if element == tag else old
        offset += 8 + length
    return out


def test_the_listener_reads_store_requests_without_pynetdicom(
    scp: Scp, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[C_STORE | None] = []

    def recording(command: bytes, data_set: BytesIO) -> C_STORE | None:
        read.append(store_request(command, data_set))
        return read[-1]

    monkeypatch.setattr(dimse_transport, "store_request", recording)
    scu = AE(ae_title="SCU")
    scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = scu.associate("127.0.0.1", scp.port, ae_title="SCP", max_pdu=MAXIMUM_PDU_SIZE)
    ds = ct_instance(Phi(), 1, rows=16, columns=16)
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    assert len(read) == 1 and read[0] is not None
    assert read[0].AffectedSOPInstanceUID == ds.SOPInstanceUID


def _p_data_tf_body(items: list[tuple[int, bytes]]) -> bytes:
    """A P-DATA-TF PDU's bytes after its header, as pynetdicom encodes them."""
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[c, d] for c, d in items]
    return P_DATA_TF(primitive).encode()[6:]


def test_p_data_tf_is_read_as_pynetdicom_reads_it_without_copies() -> None:
    items = [(1, b"\x03" + b"c" * 99), (3, b"\x00" + b"d" * 1000), (3, b"\x02" + b"e")]
    body = bytearray(_p_data_tf_body(items))
    ours = p_data_tf(body).to_primitive().presentation_data_value_list
    theirs_pdu = P_DATA_TF()
    theirs_pdu.decode(b"\x04\x00" + struct.pack(">L", len(body)) + body)
    theirs = theirs_pdu.to_primitive().presentation_data_value_list
    assert [(c, bytes(d)) for c, d in ours] == [(c, bytes(d)) for c, d in theirs] == items
    for _, data in ours:  # views of what was read: its bytes are not copied
        assert isinstance(data, memoryview) and data.obj is body


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x00\x00",  # an item's length cut short
        b"\x00\x00\x00\x00\x01",  # an item of length 0
        b"\x00\x00\x00\x09\x01\x03ab",  # an item longer than the PDU
    ],
)
def test_malformed_p_data_tf_is_refused_as_pynetdicom_refuses_it(body: bytes) -> None:
    with pytest.raises(ValueError):
        p_data_tf(body)
    with pytest.raises((AssertionError, struct.error)):
        P_DATA_TF().decode(b"\x04\x00" + struct.pack(">L", len(body)) + body)


def _push(count: int, watch: tuple[evt.EventType, Callable[[Event], None]] | None) -> list[bytes]:
    """What a new SCP on Carina's transport receives of count small CT instances sent over
    one association, with watch's handler bound to its event, if given."""
    scp = Scp(LowLatencyAssociationServer)
    try:
        if watch is not None:
            scp.server.bind(*watch)
        scu = AE(ae_title="SCU")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", scp.port, ae_title="SCP", max_pdu=MAXIMUM_PDU_SIZE)
        for n in range(1, count + 1):
            assert assoc.send_c_store(ct_instance(Phi(), n, rows=64, columns=64)).Status == 0
        assoc.release()
    finally:
        scp.stop()
    assert len(scp.received) == count
    assert all(dcmread(BytesIO(r)).SOPClassUID == CTImageStorage for r in scp.received)
    return scp.received


def test_the_listener_decodes_data_pdus_itself_unless_a_handler_watches_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoded: list[int] = []

    def recording(body: bytearray) -> P_DATA_TF:
        decoded.append(len(body))
        return p_data_tf(body)

    monkeypatch.setattr(dimse_transport, "p_data_tf", recording)
    _push(1, None)
    assert decoded  # the request's command and data set PDUs
    decoded.clear()
    seen: list[object] = []
    _push(1, (evt.EVT_PDU_RECV, lambda e: seen.append(e.pdu)))
    assert not decoded  # with a handler bound, pynetdicom decodes and the handler sees each
    assert any(isinstance(pdu, P_DATA_TF) for pdu in seen)


def test_data_pdus_skip_the_state_machine_unless_a_handler_watches_its_transitions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In Sta6 a P-DATA-TF goes straight to the DIMSE provider (DT-2 without the state
    machine's queues); a handler bound to EVT_FSM_TRANSITION still sees every DT-2."""
    actions: list[str] = []
    do_action = StateMachine.do_action

    def recording(self: StateMachine, event: str) -> None:
        if isinstance(self.dul, AcceptorDUL):
            actions.append(event)
        do_action(self, event)

    monkeypatch.setattr(StateMachine, "do_action", recording)
    _push(2, None)
    assert "Evt10" not in actions and "Evt6" in actions  # the association went through
    actions.clear()
    transitions: list[str] = []
    _push(2, (evt.EVT_FSM_TRANSITION, lambda e: transitions.append(e.action)))
    assert actions.count("Evt10") >= 4  # each request's command and data set PDUs
    assert transitions.count("DT-2") == actions.count("Evt10")


def test_a_pdu_that_has_arrived_is_read_without_polling_first(
    scp: Scp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DUL looks at its socket once per PDU (its wait), not again before reading, and
    reads what has arrived with one system call (a socket with a timeout polls first)."""
    looks: list[int] = []
    reads: list[int] = []
    ready = AcceptorSocket.ready
    readv = os.readv

    def counting_ready(self: AcceptorSocket) -> bool:
        looks.append(1)
        return bool(ready.fget(self))  # type: ignore[attr-defined]

    def counting_readv(fd: int, buffers: list[memoryview]) -> int:
        reads.append(fd)
        return readv(fd, buffers)

    monkeypatch.setattr(AcceptorSocket, "ready", property(counting_ready))
    monkeypatch.setattr(dimse_transport.os, "readv", counting_readv)
    scu = AE(ae_title="SCU")
    scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = scu.associate("127.0.0.1", scp.port, ae_title="SCP", max_pdu=MAXIMUM_PDU_SIZE)
    looks.clear()
    reads.clear()
    for n in range(1, 6):
        assert assoc.send_c_store(ct_instance(Phi(), n, rows=64, columns=64)).Status == 0
    assoc.release()
    assert len(scp.received) == 5
    assert len(reads) >= 20  # header and body of each request's command and data PDUs
    assert len(looks) <= 5, looks  # pynetdicom looks before each of them (20 or more)


def test_a_malformed_data_pdu_aborts_its_association_only(scp: Scp) -> None:
    scu = AE(ae_title="SCU")
    scu.add_requested_context(Verification)
    scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = scu.associate("127.0.0.1", scp.port, ae_title="SCP", max_pdu=MAXIMUM_PDU_SIZE)
    assert assoc.is_established
    other = scu.associate("127.0.0.1", scp.port, ae_title="SCP", max_pdu=MAXIMUM_PDU_SIZE)
    # A P-DATA-TF whose one item has length 0 (PS3.8 9.3.5.1: at least the context ID).
    assert assoc.dul.socket is not None
    assoc.dul.socket.send(b"\x04\x00" + struct.pack(">L", 5) + bytes(4) + b"\x01")
    deadline = time.monotonic() + 10
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted  # the listener answered with an A-ABORT (AA-8)
    assert other.send_c_echo().Status == 0  # the other association goes on
    assert other.send_c_store(ct_instance(Phi(), 1, rows=16, columns=16)).Status == 0
    other.release()
    assert len(scp.received) == 1


def test_store_response_with_other_elements_is_left_to_pynetdicom() -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.3"
    rsp.Status = 0xC000
    rsp.OffendingElement = [0x00100010]
    assert store_response_command(rsp) is None


def test_pynetdicom_reads_the_listeners_store_responses_with_their_comments() -> None:
    comment = "odd length comment"
    scp = Scp(LowLatencyAssociationServer)
    try:
        scp.server.unbind(evt.EVT_C_STORE, scp._store)
        scp.server.bind(evt.EVT_C_STORE, lambda e: _status(0xB006, comment))
        scu = AE(ae_title="SCU")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", scp.port, ae_title="SCP", max_pdu=MAXIMUM_PDU_SIZE)
        ds = ct_instance(Phi(), 1, rows=16, columns=16)
        status = assoc.send_c_store(ds)
        assoc.release()
    finally:
        scp.stop()
    assert status.Status == 0xB006
    assert status.ErrorComment == comment


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment
    return status


@pytest.mark.parametrize("sop_uid", ["1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.12"])
def test_received_dataset_becomes_the_file_pynetdicom_would_write(sop_uid: str) -> None:
    files: list[tuple[bytes | None, bytes]] = []

    def keep(event: Event) -> int:
        ours = part10(event.request, event.context.transfer_syntax)
        files.append((ours, event.encoded_dataset(include_meta=True)))
        return 0

    scp = Scp(LowLatencyAssociationServer)
    try:
        scp.server.unbind(evt.EVT_C_STORE, scp._store)
        scp.server.bind(evt.EVT_C_STORE, keep)
        scu = AE(ae_title="SCU")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", scp.port, ae_title="SCP", max_pdu=MAXIMUM_PDU_SIZE)
        ds = ct_instance(Phi(), 1, rows=16, columns=16)
        ds.SOPInstanceUID = sop_uid
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
    finally:
        scp.stop()
    ((ours, theirs),) = files
    assert ours == theirs
    assert dcmread(BytesIO(ours)).file_meta.MediaStorageSOPInstanceUID == sop_uid


def test_no_debug_logging_handler_runs_for_each_pdu_and_message(scp: Scp) -> None:
    # pynetdicom's standard handlers format a line per PDU and DIMSE message at any log level.
    logging_events = (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)
    assert all(not scp.server.get_handlers(e) for e in logging_events)
    # The intervention defaults stay: C-ECHO is answered, associations negotiated.
    scu = AE(ae_title="SCU")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", scp.port, ae_title="SCP")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    (accepted,) = scp.server.active_associations
    assert all(not accepted.get_handlers(e) for e in logging_events)
    assoc.release()


def test_store_response_leaves_from_the_handlers_thread_without_a_hand_over() -> None:
    handled: list[threading.Thread] = []
    sent: list[threading.Thread] = []

    def store(event: Event) -> int:
        handled.append(threading.current_thread())
        return 0

    def pdu_sent(event: Event) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            sent.append(threading.current_thread())

    scp = Scp(LowLatencyAssociationServer)
    try:
        scp.server.unbind(evt.EVT_C_STORE, scp._store)
        scp.server.bind(evt.EVT_C_STORE, store)
        scp.server.bind(evt.EVT_PDU_SENT, pdu_sent)
        scu = AE(ae_title="SCU")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", scp.port, ae_title="SCP", max_pdu=MAXIMUM_PDU_SIZE)
        statuses = [assoc.send_c_store(ct_instance(Phi(), n, rows=16, columns=16)) for n in (1, 2)]
        assoc.release()
    finally:
        scp.stop()
    assert [s.Status for s in statuses] == [0, 0]
    assert sent == handled and len(sent) == 2


def test_release_request_is_answered_without_waiting_for_the_idle_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The reactor waits for DIMSE messages; a release request is none, and is answered at
    # once only because the DUL wakes the reactor: with an idle timer longer than the
    # requestor's wait for the release response, an unwoken reactor would miss it.
    monkeypatch.setattr("carina.api.dimse_transport.IDLE_WAIT", 60.0)
    s = Scp(LowLatencyAssociationServer)
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(Verification)
        scu.acse_timeout = 10
        assoc = scu.associate("127.0.0.1", s.port, ae_title="SCP")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert assoc.is_released
        assert not assoc.is_aborted
    finally:
        s.stop()
