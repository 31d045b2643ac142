"""Wake pynetdicom's acceptor threads when there is work instead of polling every 1 ms.

pynetdicom (3.0) runs two loops per association. The DUL thread sleeps
``_run_loop_delay`` (1 ms) whenever a pass found nothing to do; the association thread
sleeps 1 ms before every look at its DIMSE message queue. On one association every
C-STORE crosses both loops twice (request in, response out), so about 1.5 ms of each
instance was spent asleep with the data already there (measured: 300 × 512×512 CT with
a handler that stores nothing, 1.13 s polling, 0.69 s with shorter sleeps).

Here the DUL thread waits in ``select`` on the peer's socket plus a wake-up socket pair
that :meth:`WakingDUL.send_pdu` and :meth:`WakingDUL.kill_dul` write to, and the
association thread blocks on its message queue. Both waits are capped at
:data:`MAX_WAIT` so that the loops still run their other checks (timers, release and
abort, the kill flag) as before, only far less often when idle.

Only acceptor associations made by our listener use these classes
(:class:`WakingRequestHandler`); pynetdicom's state machine and PDU handling are its own.
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any

from pynetdicom import evt
from pynetdicom._handlers import standard_dimse_sent_handler
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import RequestHandler

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


def c_store_success_command(primitive: C_STORE) -> bytes | None:
    """The command set of a plain successful C-STORE-RSP, encoded by hand (pynetdicom builds
    a pydicom Dataset and encodes it: ~0.4 ms of every instance); None for anything else."""
    if (primitive.MessageIDBeingRespondedTo is None or primitive.Status != 0x0000
            or primitive.MessageID is not None or not primitive.AffectedSOPClassUID
            or not primitive.AffectedSOPInstanceUID):
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


class WaitingDIMSE(DIMSEServiceProvider):
    """The association thread's non-blocking look at the message queue waits briefly, and
    a successful C-STORE-RSP goes out pre-encoded (tests/unit/test_reactor_encoding.py
    checks it is byte for byte what pynetdicom sends)."""

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
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        self.dul.send_pdu(pdata)

    def get_msg(self, block: bool = False) -> Any:
        if block or threading.current_thread() is not self.assoc:
            return super().get_msg(block)
        try:
            return self.msg_queue.get(timeout=MAX_WAIT)
        except queue.Empty:
            return None, None


def make_waking(assoc: Association) -> Association:
    """Give a new, not yet started acceptor association the waking providers."""
    if assoc.is_alive() or assoc.dul.is_alive():
        raise RuntimeError("providers can only be replaced before the association starts")
    old = assoc.dul
    assoc.dul = WakingDUL(assoc)
    while not old.event_queue.empty():  # "connection open" (Evt5), queued by the socket
        assoc.dul.event_queue.put(old.event_queue.get_nowait())
    if old.socket is not None:
        assoc.set_socket(old.socket)
    assoc.network_timeout = assoc.network_timeout  # the idle timer lives in the DUL
    assoc.dimse = WaitingDIMSE(assoc)
    return assoc


class WakingRequestHandler(RequestHandler):
    """pynetdicom's connection handler, with :func:`make_waking` applied."""

    def _create_association(self) -> Association:
        return make_waking(super()._create_association())
