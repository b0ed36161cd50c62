"""The DICOM listener's transport: pynetdicom's threaded server, with the per-message latency of
its acceptor taken out.

pynetdicom 3.0 runs two threads per association that poll: the DUL reader sleeps 1 ms whenever
the socket has nothing to read, and the association's reactor sleeps 1 ms before each look for
a complete DIMSE message. A C-STORE waits for both on the way in and for the DUL again on the way
out (~1.5 ms of a ~5 ms round trip), and every idle association wakes 2,000 times a second,
taking the GIL from the threads that work. Here the DUL waits on its socket and on a wake-up
pipe written when a PDU is handed to it, and the reactor waits on its message queue; each wakes
at least every IDLE_WAIT to check its timers, as the polling did. pynetdicom reads the socket
4 KiB at a time (128 reads for a 0.5 MB CT); here a PDU is read in as few reads as the kernel
allows. Requestor associations (C-MOVE to a peer) are pynetdicom's own.

The two loops are pynetdicom 3.0's (`DULServiceProvider.run_reactor`,
`Association._run_reactor`) with only their sleep replaced; pyproject pins pynetdicom 3.0.x."""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import time
from copy import deepcopy
from datetime import datetime
from typing import Any

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = logging.getLogger(__name__)

# Longest an idle thread waits before checking its timers (ARTIM, network timeout) and whether
# it was killed; pynetdicom's polling checked every 1 ms.
IDLE_WAIT = 0.01
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
        buffer = bytearray()
        while len(buffer) < nr_bytes:
            data = self.socket.recv(min(nr_bytes - len(buffer), RECV_SIZE))
            if _TCP_QUICKACK is not None:
                self.socket.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            if not data:  # connection closed: what arrived so far, as pynetdicom returns it
                break
            buffer += data
        return buffer


class AcceptorDUL(DULServiceProvider):
    """pynetdicom's DICOM Upper Layer provider, waiting for its socket or a PDU to send instead
    of sleeping 1 ms between looks."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def send_pdu(self, primitive: Any) -> None:
        """Queue a primitive to send, and wake the reactor to send it."""
        super().send_pdu(primitive)
        self._wake()

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
        try:
            if sock is None:
                raise ValueError("no connection")
            select.select([sock, self._wake_r], [], [], IDLE_WAIT)
        except (OSError, ValueError):  # closed: the reactor's next look finds out
            time.sleep(self._run_loop_delay)
        with contextlib.suppress(OSError):  # drained
            while self._wake_r.recv(4096):
                pass

    def run_reactor(self) -> None:
        """pynetdicom 3.0's DUL loop (dul.py), waiting in _wait where it slept."""
        try:
            self._run()
        finally:
            self._wake_r.close()
            self._wake_w.close()

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
            sleep = False


class Acceptor(Association):
    """An acceptor association whose reactor waits for a DIMSE message instead of sleeping
    1 ms before each look. Nothing else may call its send_* methods from another thread (the
    C-GET handler sends from the reactor's own thread)."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self.dul = AcceptorDUL(self)
        # The timeouts pynetdicom set on the DUL it made (ARTIM, idle), on this one.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def _wait(self) -> None:
        """Until a DIMSE message is queued, or IDLE_WAIT passed."""
        messages = self.dimse.msg_queue
        with messages.not_empty:
            if not messages.queue:
                messages.not_empty.wait(IDLE_WAIT)

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
    RequestHandler._create_association, with those two classes)."""

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
        acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:  # type: ignore[misc]
                    assoc.bind(event, handler, args)
        return assoc


class LowLatencyAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with Acceptor associations and small messages sent at once
    (TCP_NODELAY)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", AcceptorRequestHandler)
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection and tune it for request/response traffic."""
        sock, address = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address


__all__ = ["IDLE_WAIT", "MAXIMUM_PDU_SIZE", "LowLatencyAssociationServer"]
