"""Our acceptor associations: pynetdicom's machinery, with the waits and hand-overs that
cost every C-STORE taken out of its critical path.

pynetdicom (3.0) runs two loops per association. The DUL thread reads and decodes PDUs
and sleeps ``_run_loop_delay`` (1 ms) whenever a pass found nothing to do; the
association thread takes completed messages off a queue (after a 1 ms sleep), runs the
service, and queues the response back to the DUL thread. On one association every
instance waited in both loops (measured: 300 × 512×512 CT with a handler that stores
nothing, 1.13 s polling, 0.69 s with shorter sleeps) and crossed threads twice.

Here:

- the DUL thread waits in ``select`` on the peer's socket plus a wake-up socket pair that
  :meth:`WakingDUL.send_pdu` and :meth:`WakingDUL.kill_dul` write to, and the association
  thread blocks on its message queue; both waits are capped at :data:`MAX_WAIT` so that
  the loops still run their other checks (timers, release and abort, the kill flag);
- a C-STORE request is served on the DUL thread that completed it when the association
  thread has nothing queued or in hand (:class:`WaitingDIMSE`), and its response, when it
  is a plain success, goes out pre-encoded, straight to the socket when nothing else is
  waiting to be sent;
- PDUs are read with as few ``recv`` calls as the kernel allows (:class:`BulkReadSocket`).

Only acceptor associations made by our listener use these classes
(:class:`WakingRequestHandler`); pynetdicom's state machine, PDU decoding, DIMSE message
assembly and service classes are its own. Measured in bench/RESULTS.md (issue 2).
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any, cast

from pynetdicom import evt
from pynetdicom._handlers import standard_dimse_sent_handler, standard_pdu_sent_handler
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from node.part10 import ui_value

# Longest a loop waits for an event before it runs its periodic checks anyway.
MAX_WAIT = 0.01


class WakingDUL(DULServiceProvider):
    """A DUL provider whose idle pause ends as soon as the socket or the user has work.

    pynetdicom's loop reads ``_run_loop_delay`` and sleeps that long when idle. On the
    DUL's own thread the attribute waits for work itself and then reports no delay;
    other threads (``stop_dul`` polls from the association thread) see the plain delay.
    """

    def __init__(self, assoc: Association) -> None:
        self._wake_lock = threading.Lock()
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)
        self._idle_delay = 0.001
        super().__init__(assoc)

    @property
    def _run_loop_delay(self) -> float:
        if threading.current_thread() is not self:
            return self._idle_delay
        self._wait_for_work()
        return 0.0

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        self._idle_delay = value

    def _wait_for_work(self) -> None:
        if not self.to_provider_queue.empty() or not self.event_queue.empty():
            return
        peer = getattr(self.socket, "socket", None)
        if peer is None:
            time.sleep(self._idle_delay)  # not connected (yet, or any more)
            return
        if isinstance(peer, ssl.SSLSocket) and peer.pending():
            return  # decrypted bytes already buffered: select would not see them
        try:
            ready, _, _ = select.select([peer, self._wake_recv], [], [], MAX_WAIT)
        except (OSError, ValueError):
            time.sleep(self._idle_delay)  # closed under us; the loop finds out itself
            return
        if self._wake_recv in ready:
            try:
                while self._wake_recv.recv(256):
                    pass
            except OSError:
                pass  # drained (BlockingIOError) or closed

    def _wake(self) -> None:
        with self._wake_lock:
            try:
                self._wake_send.send(b"\x00")
            except OSError:
                pass  # buffer full (a wake-up is pending anyway) or already closed

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            with self._wake_lock:
                self._wake_send.close()
                self._wake_recv.close()


def _implicit(element: int, value: bytes) -> bytes:
    """One group-0000 element in Implicit VR Little Endian (PS3.7 6.3.1)."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def p_data_tf(context_id: int, value: bytes) -> bytes:
    """A P-DATA-TF PDU of one presentation data value item (PS3.8 9.3.5)."""
    item = struct.pack(">IB", len(value) + 1, context_id) + value
    return struct.pack(">BBI", 0x04, 0x00, len(item)) + item


def c_store_success_command(primitive: C_STORE) -> bytes | None:
    """The command set of a plain successful C-STORE-RSP, encoded by hand (pynetdicom builds
    a pydicom Dataset and encodes it: ~0.4 ms of every instance); None for anything else."""
    # (MessageID is not part of a C-STORE-RSP: pynetdicom's service class sets it on the
    #  response primitive anyway, and its encoder leaves it out)
    if (primitive.MessageIDBeingRespondedTo is None or primitive.Status != 0x0000
            or primitive.ErrorComment is not None or primitive.OffendingElement is not None
            or not primitive.AffectedSOPClassUID or not primitive.AffectedSOPInstanceUID):
        return None
    body = b"".join((
        _implicit(0x0002, ui_value(str(primitive.AffectedSOPClassUID))),
        _implicit(0x0100, struct.pack("<H", 0x8001)),     # CommandField: C-STORE-RSP
        _implicit(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
        _implicit(0x0800, struct.pack("<H", 0x0101)),     # CommandDataSetType: none
        _implicit(0x0900, struct.pack("<H", 0x0000)),     # Status: Success
        _implicit(0x1000, ui_value(str(primitive.AffectedSOPInstanceUID))),
    ))
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


class _ServeOnArrival(queue.Queue):  # type: ignore[type-arg]
    """The DIMSE provider's message queue, which pynetdicom's DUL thread fills as messages
    complete: a C-STORE request it may serve on the spot never enters the queue."""

    def __init__(self, dimse: WaitingDIMSE) -> None:
        super().__init__()
        self._dimse = dimse

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, primitive = item
        if self._dimse.serve_here(context_id, primitive):
            return
        self._dimse.handed_over()
        super().put(item, block, timeout)


class WaitingDIMSE(DIMSEServiceProvider):
    """DIMSE for our acceptor associations.

    - C-STORE requests are served on the DUL thread that decoded them, when the
      association thread has nothing queued or in hand (a sender that waits for each
      response, which is every sender without asynchronous operations). pynetdicom would
      queue the request for the association thread and queue the response back to the DUL
      thread: two thread hand-overs of ~0.2-0.3 ms each on every instance's critical path.
      The request still goes through pynetdicom's own service code
      (``Association._serve_request``: context check, handler, status validation), only
      on the other thread; anything else, or a C-STORE while the association thread is
      busy, takes pynetdicom's usual way, so responses keep their order.
    - The association thread's non-blocking look at the message queue waits briefly.
    - A successful C-STORE-RSP goes out pre-encoded (tests/unit/test_reactor_encoding.py
      checks it is byte for byte what pynetdicom sends).
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self.msg_queue = _ServeOnArrival(self)
        self._count_lock = threading.Lock()
        self._handed_over = 0      # queued for the association thread and not yet served
        self._in_hand = False      # (association thread) it took a message and serves it

    def handed_over(self) -> None:
        with self._count_lock:
            self._handed_over += 1

    def serve_here(self, context_id: int | None, primitive: Any) -> bool:
        """Serve a completed C-STORE request now, on this (the DUL) thread, if that is
        safe; False leaves it to the association thread."""
        assoc = self.assoc
        if (not isinstance(primitive, C_STORE) or not primitive.is_valid_request
                or threading.current_thread() is not self.dul
                or getattr(primitive, "_dataset_file", None) is not None
                or not assoc.is_established or assoc._sent_release or assoc._sent_abort
                or context_id not in assoc._accepted_cx):
            return False
        with self._count_lock:
            if self._handed_over:
                return False
        # Nothing is queued or being served, and only this thread queues messages: the
        # association thread cannot start on anything before this request is answered.
        assoc.abort = assoc._abort_nonblocking  # type: ignore[method-assign]
        try:                                    # (a blocking abort would wait for us)
            assoc._serve_request(primitive, context_id)
        finally:
            assoc.abort = assoc._abort_blocking  # type: ignore[method-assign]
        return True

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = c_store_success_command(primitive) if isinstance(primitive, C_STORE) \
            else None
        limit = self.maximum_pdu_size
        handlers = self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        if (command is None or (limit and len(command) + 6 > limit)
                or any(not isinstance(h, tuple) or h[0] is not standard_dimse_sent_handler
                       for h in handlers)):
            super().send_msg(primitive, context_id)   # (the standard handler logs nothing
            return                                    #  for a C-STORE-RSP)
        value = b"\x03" + command                  # a command, its last fragment
        if self._may_send_now():
            self.dul.socket.send(p_data_tf(context_id, value))   # type: ignore[union-attr]
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, value))
        self.dul.send_pdu(pdata)

    def _may_send_now(self) -> bool:
        """On the DUL thread (a C-STORE served there), with the association established
        and nothing queued to send before it, the response PDU can go straight out: it is
        what the state machine's DT-1 action would send, in Sta6, staying in Sta6."""
        dul = self.dul
        return (threading.current_thread() is dul and dul.socket is not None
                and dul.state_machine.current_state == "Sta6"
                and dul.to_provider_queue.empty()
                and all(isinstance(h, tuple) and h[0] is standard_pdu_sent_handler
                        for h in self.assoc.get_handlers(evt.EVT_PDU_SENT)))

    def get_msg(self, block: bool = False) -> Any:
        if block or threading.current_thread() is not self.assoc:
            return super().get_msg(block)     # (what these take stays counted: safe)
        if self._in_hand:                     # the association thread is back: the
            self._in_hand = False             # message it took last time is answered
            with self._count_lock:
                self._handed_over -= 1
        try:
            item = self.msg_queue.get(timeout=MAX_WAIT)
        except queue.Empty:
            return None, None
        self._in_hand = True
        return item


class BulkReadSocket(AssociationSocket):
    """pynetdicom's socket wrapper, reading a PDU with as few ``recv`` calls as the kernel
    allows into one buffer (pynetdicom reads 4 KiB at a time: 64 calls and copies for
    each 256 KiB PDU, ~0.1 ms).

    Same contract: blocks until ``nr_bytes`` are read, returns fewer only when the peer
    closed the connection, lets socket errors and timeouts through.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        buffer = bytearray(nr_bytes)
        done = 0
        with memoryview(buffer) as view:
            while done < nr_bytes:
                got = sock.recv_into(view[done:], nr_bytes - done)
                if not got:
                    break
                done += got
        del buffer[done:]
        return buffer


def make_waking(assoc: Association) -> Association:
    """Give a new, not yet started acceptor association the waking providers."""
    if assoc.is_alive() or assoc.dul.is_alive():
        raise RuntimeError("providers can only be replaced before the association starts")
    old = assoc.dul
    assoc.dul = WakingDUL(assoc)
    while not old.event_queue.empty():  # "connection open" (Evt5), queued by the socket
        assoc.dul.event_queue.put(old.event_queue.get_nowait())
    if old.socket is not None:
        if type(old.socket) is AssociationSocket:   # (only the plain one, never a subclass)
            old.socket.__class__ = BulkReadSocket
        assoc.set_socket(old.socket)
    assoc.network_timeout = assoc.network_timeout  # the idle timer lives in the DUL
    assoc.dimse = WaitingDIMSE(assoc)
    return assoc


class WakingRequestHandler(RequestHandler):
    """pynetdicom's connection handler, with :func:`make_waking` applied."""

    def _create_association(self) -> Association:
        return make_waking(super()._create_association())
