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
  the loops still run their other checks (timers, the kill flag), and a release or abort
  indication for the association thread ends its wait at once (:class:`_UserQueue`);
- the P-DATA-TF PDUs of an established association go to adapters/pdata.py's reader on
  the DUL thread, which serves a C-STORE request right there when the association
  thread has nothing queued or in hand (:class:`WaitingDIMSE`), and its response, when
  it is a plain success, goes out pre-encoded, straight to the socket when nothing else
  is waiting to be sent; every other message is pynetdicom's;
- PDUs are read with as few ``recv`` calls as the kernel allows (:class:`BulkReadSocket`);
- an A-ASSOCIATE-RQ PDU whose bytes this process has decoded before is not decoded
  again (:class:`RememberedRequest`): a sender proposes the same contexts every time,
  and pynetdicom's decoding of dcmtk storescu's 128 contexts cost ~10 ms of CPU per
  association, a third of all its set-up;
- likewise the A-ASSOCIATE-AC PDU of an acceptance this process has sent before is sent
  again as it was encoded then (:class:`RememberedAccept`, action AE-7 of
  :class:`AcceptingStateMachine`): making it from the primitive validates every
  accepted transfer syntax UID three times over, a quarter of the CPU an association
  with one small instance cost;
- and the outcome of negotiating the same proposal against the same supported contexts
  is computed once (:data:`remembered_negotiations`, in place of pynetdicom's
  ``negotiate_unrestricted``; each association gets its own copy): ~3.8 ms of CPU for
  storescu's 128 contexts, the largest part of an association's set-up left.

Only acceptor associations made by our listener use these classes
(:class:`WakingRequestHandler`); pynetdicom's state machine (but for AE-7), association
negotiation (but for the remembered outcomes), the decoding of PDUs other than
P-DATA-TF, DIMSE messages other than those C-STOREs, and its service classes are its
own. Measured in bench/RESULTS.md (issues 2, 9).
"""

from __future__ import annotations

import copy
import functools
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from typing import Any, Generic, TypeVar, cast

from pynetdicom import acse, evt, presentation
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import AssociationSocket, RequestHandler

from adapters.pdata import DirectStore, MalformedPdu, PDataReader, p_data
from node.part10 import ui_value

# Longest a loop waits for an event before it runs its periodic checks anyway.
MAX_WAIT = 0.01
# Largest read BulkReadSocket allocates in one piece (a PDU header may claim up to 4 GiB:
# anything above this is read as pynetdicom reads it, as it arrives).
BULK_READ_MAX = 16 << 20
# Distinct association requests a process keeps decoded (one per sender configuration).
REMEMBERED_REQUESTS = 32
_A_ASSOCIATE_RQ = b"\x01"        # PDU type
_A_ASSOCIATE_AC = 0x02           # PDU type
_EVT6 = "Evt6"                   # PS3.8 9.2: A-ASSOCIATE-RQ PDU received
_EVT7 = "Evt7"                   # A-ASSOCIATE response primitive (accept) from the user
_STA3 = "Sta3"                   # awaiting the local user's response to the request
_UNSET = object()
_WAKE = object()                 # on a DIMSE message queue: not a message, "look around"

log = logging.getLogger(__name__)


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
        self._pdata_reader: object = _UNSET
        super().__init__(assoc)
        self.state_machine = AcceptingStateMachine(self)
        self.to_user_queue = _UserQueue(assoc)

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

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """pynetdicom's, but an A-ASSOCIATE-RQ comes from :func:`remembered_request` (the
        same events are triggered, with the same data)."""
        if bytestream[:1] != _A_ASSOCIATE_RQ:
            return super()._decode_pdu(bytestream)
        data = bytes(bytestream)
        evt.trigger(self.assoc, evt.EVT_DATA_RECV, {"data": data})
        pdu = remembered_request(data)
        evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        return pdu, _EVT6

    def _read_pdu_data(self) -> None:
        """P-DATA-TF PDUs of an established association go to adapters/pdata.py's reader,
        every other PDU to pynetdicom (it reads the 6 bytes taken to tell them apart)."""
        sock = self.socket
        reader = self._reader()
        if reader is None or not isinstance(sock, BulkReadSocket):
            super()._read_pdu_data()
            return
        header = sock.recv(6)
        while True:
            if len(header) != 6 or header[0] != 0x04:
                sock.unread(header)
                super()._read_pdu_data()
                return
            length = struct.unpack_from(">I", header, 2)[0]
            body = sock.recv(length)
            if len(body) != length:       # as pynetdicom: the connection closed mid-PDU
                log.error("The received PDU is shorter than expected (%d of %d bytes "
                          "received)", len(body) + 6, length + 6)
                self.event_queue.put("Evt17")
                return
            try:
                reader.feed(memoryview(body))
            except MalformedPdu as exc:   # as pynetdicom: an invalid PDU aborts (AA-8)
                log.error("Unable to decode the received P-DATA-TF PDU: %s", exc)
                self.event_queue.put("Evt19")
                return
            # The rest of a data set being received here: its next PDU, when it has begun
            # to arrive, is read at once instead of after another pass of pynetdicom's
            # loop (its timers, queues, two selects and a GIL release: ~40 calls a PDU).
            if not reader.mid_data_set or self._kill_thread:
                return
            header = sock.recv_arrived(6)
            if not header:
                return

    def _reader(self) -> PDataReader | None:
        if self.state_machine.current_state != "Sta6":
            return None
        if self._pdata_reader is _UNSET:
            dimse = self.assoc.dimse
            self._pdata_reader = dimse.pdata_reader() if isinstance(dimse, WaitingDIMSE) \
                else None
        return cast(PDataReader | None, self._pdata_reader)

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            if isinstance(self._pdata_reader, PDataReader):
                self._pdata_reader.close()     # a half-received instance is removed
            with self._wake_lock:
                self._wake_send.close()
                self._wake_recv.close()


def _only_standard(assoc: Association, event: Any, *allowed: Any) -> bool:
    """Whether nothing but ``allowed`` (pynetdicom's own debug loggers) is bound to a
    notification ``event``: then nobody misses it when we do its work by hand."""
    return all(isinstance(h, tuple) and h[0] in allowed for h in assoc.get_handlers(event))


def _implicit(element: int, value: bytes) -> bytes:
    """One group-0000 element in Implicit VR Little Endian (PS3.7 6.3.1)."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def p_data_tf(context_id: int, value: bytes) -> bytes:
    """A P-DATA-TF PDU of one presentation data value item (PS3.8 9.3.5)."""
    item = struct.pack(">IB", len(value) + 1, context_id) + value
    return struct.pack(">BBI", 0x04, 0x00, len(item)) + item


def c_store_response_command(message_id: int, sop_class_uid: str, sop_instance_uid: str,
                             status: int) -> bytes:
    """The command set of a C-STORE-RSP without error comment or offending element,
    encoded by hand (pynetdicom builds a pydicom Dataset and encodes it: ~0.4 ms)."""
    body = b"".join((
        _implicit(0x0002, ui_value(sop_class_uid)),
        _implicit(0x0100, struct.pack("<H", 0x8001)),     # CommandField: C-STORE-RSP
        _implicit(0x0120, struct.pack("<H", message_id)),  # MessageIDBeingRespondedTo
        _implicit(0x0800, struct.pack("<H", 0x0101)),     # CommandDataSetType: none
        _implicit(0x0900, struct.pack("<H", status)),
        _implicit(0x1000, ui_value(sop_instance_uid)),
    ))
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


def c_store_success_command(primitive: C_STORE) -> bytes | None:
    """:func:`c_store_response_command` for pynetdicom's response primitive when it is a
    plain success; None for anything else (pynetdicom encodes those)."""
    # (MessageID is not part of a C-STORE-RSP: pynetdicom's service class sets it on the
    #  response primitive anyway, and its encoder leaves it out)
    if (primitive.MessageIDBeingRespondedTo is None or primitive.Status != 0x0000
            or primitive.ErrorComment is not None or primitive.OffendingElement is not None
            or not primitive.AffectedSOPClassUID or not primitive.AffectedSOPInstanceUID):
        return None
    return c_store_response_command(primitive.MessageIDBeingRespondedTo,
                                    str(primitive.AffectedSOPClassUID),
                                    str(primitive.AffectedSOPInstanceUID), 0x0000)


class _UserQueue(queue.Queue):  # type: ignore[type-arg]
    """The DUL's queue of primitives for the association thread (A-RELEASE and A-ABORT
    indications, the association request): putting one also ends that thread's wait for
    a DIMSE message (:meth:`WaitingDIMSE.wake`), which would otherwise see it only after
    :data:`MAX_WAIT` - a peer's A-RELEASE-RQ was answered 7.5-9.6 ms later (median
    8.4 ms, storescu sending one small instance), and a sender exits only then."""

    def __init__(self, assoc: Association) -> None:
        super().__init__()
        self._assoc = assoc

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        dimse = getattr(self._assoc, "dimse", None)
        if isinstance(dimse, WaitingDIMSE):
            dimse.wake()


class _CountingQueue(queue.Queue):  # type: ignore[type-arg]
    """The DIMSE provider's message queue, which pynetdicom's DUL thread fills as messages
    complete: it counts what it hands to the association thread (see
    :meth:`WaitingDIMSE.may_serve_now`)."""

    def __init__(self, dimse: WaitingDIMSE) -> None:
        super().__init__()
        self._dimse = dimse

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self._dimse.handed_over()
        super().put(item, block, timeout)

    def put_uncounted(self, item: Any) -> None:
        """Queue something that is not a message (:data:`_WAKE`)."""
        super().put(item)


class WaitingDIMSE(DIMSEServiceProvider):
    """DIMSE for our acceptor associations.

    - C-STORE requests read by adapters/pdata.py on the DUL thread are served there when
      the association thread has nothing queued or in hand (:meth:`may_serve_now`: a
      sender that waits for each response, which is every sender without asynchronous
      operations). pynetdicom would queue the request for the association thread and
      queue the response back to the DUL thread: two thread hand-overs of ~0.2-0.3 ms
      each on every instance's critical path. Anything else, or a C-STORE while the
      association thread is busy, takes pynetdicom's usual way, so responses keep their
      order.
    - The association thread's non-blocking look at the message queue waits briefly.
    - A successful C-STORE-RSP goes out pre-encoded (tests/unit/test_reactor_encoding.py
      checks it is byte for byte what pynetdicom sends).
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self.msg_queue = _CountingQueue(self)
        self._count_lock = threading.Lock()
        self._handed_over = 0      # queued for the association thread and not yet served
        self._in_hand = False      # (association thread) it took a message and serves it

    def handed_over(self) -> None:
        with self._count_lock:
            self._handed_over += 1

    def wake(self) -> None:
        """End the association thread's wait for a message now (something other than a
        message arrived for it); the marker is not a message and is not counted."""
        cast(_CountingQueue, self.msg_queue).put_uncounted(_WAKE)

    def may_serve_now(self) -> bool:
        """On the DUL thread: may a request be served here, now? Only while the
        association is up and the association thread has nothing queued or in hand."""
        assoc = self.assoc
        if (threading.current_thread() is not self.dul or not assoc.is_established
                or assoc._sent_release or assoc._sent_abort):
            return False
        with self._count_lock:
            return self._handed_over == 0

    def respond_store(self, context_id: int, message_id: int, sop_class_uid: str,
                      sop_instance_uid: str, status: int) -> None:
        """The C-STORE-RSP for a request read by adapters/pdata.py: encoded by hand, or,
        where that may not go (a peer whose PDUs are too small for it, a bound
        EVT_DIMSE_SENT handler), as pynetdicom sends one."""
        command = c_store_response_command(message_id, sop_class_uid, sop_instance_uid,
                                           status)
        if self._may_send_command(command):
            self._send_command(context_id, command)
            return
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = message_id
        rsp.AffectedSOPClassUID = sop_class_uid
        rsp.AffectedSOPInstanceUID = sop_instance_uid
        rsp.Status = status
        DIMSEServiceProvider.send_msg(self, rsp, context_id)

    def pdata_reader(self) -> PDataReader | None:
        """A reader of this association's P-DATA (adapters/pdata.py), or None where
        pynetdicom must see every PDU: a C-STORE handler without a direct entry, or
        handlers bound to the receive events (pynetdicom's own debug loggers aside)."""
        assoc = self.assoc
        handler = assoc.get_handlers(evt.EVT_C_STORE)
        store = getattr(handler[0], "__self__", None) if isinstance(handler, tuple) else None
        if not isinstance(store, DirectStore):
            return None
        if not (_only_standard(assoc, evt.EVT_DATA_RECV)
                and _only_standard(assoc, evt.EVT_PDU_RECV, standard_pdu_recv_handler)
                and _only_standard(assoc, evt.EVT_DIMSE_RECV, standard_dimse_recv_handler)):
            return None
        return PDataReader(assoc, store,
                           to_pynetdicom=lambda cx, value: self.receive_primitive(
                               p_data(cx, value)),
                           pynetdicom_busy=lambda: self.message is not None,
                           may_serve_now=self.may_serve_now,
                           respond=self.respond_store)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = c_store_success_command(primitive) if isinstance(primitive, C_STORE) \
            else None
        if command is None or not self._may_send_command(command):
            super().send_msg(primitive, context_id)
            return
        self._send_command(context_id, command)

    def _may_send_command(self, command: bytes) -> bool:
        """A hand-encoded command fits one PDU and nobody waits for EVT_DIMSE_SENT (the
        standard handler logs nothing for a C-STORE-RSP)."""
        limit = self.maximum_pdu_size
        return not (limit and len(command) + 6 > limit) and _only_standard(
            self.assoc, evt.EVT_DIMSE_SENT, standard_dimse_sent_handler)

    def _send_command(self, context_id: int, command: bytes) -> None:
        value = b"\x03" + command                  # a command, its last fragment
        if self._may_send_now():
            self.dul.socket.send(p_data_tf(context_id, value))   # type: ignore[union-attr]
            return
        self.dul.send_pdu(p_data(context_id, value))

    def _may_send_now(self) -> bool:
        """On the DUL thread (a C-STORE served there), with the association established
        and nothing queued to send before it, the response PDU can go straight out: it is
        what the state machine's DT-1 action would send, in Sta6, staying in Sta6."""
        dul = self.dul
        return (threading.current_thread() is dul and dul.socket is not None
                and dul.state_machine.current_state == "Sta6"
                and dul.to_provider_queue.empty()
                and _only_standard(self.assoc, evt.EVT_PDU_SENT, standard_pdu_sent_handler))

    def get_msg(self, block: bool = False) -> Any:
        if block or threading.current_thread() is not self.assoc:
            item = super().get_msg(block)     # (what these take stays counted: safe)
            while item is _WAKE:
                item = super().get_msg(block)
            return item
        if self._in_hand:                     # the association thread is back: the
            self._in_hand = False             # message it took last time is answered
            with self._count_lock:
                self._handed_over -= 1
        try:
            item = self.msg_queue.get(timeout=MAX_WAIT)
        except queue.Empty:
            return None, None
        if item is _WAKE:
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

    _pushback = b""

    def unread(self, data: bytes | bytearray) -> None:
        """Give bytes back: the next :meth:`recv` returns them first."""
        self._pushback = bytes(data) + self._pushback

    def recv_arrived(self, nr_bytes: int) -> bytearray:
        """:meth:`recv` when some of the bytes have arrived already (then it waits for the
        rest); empty at once when none have, and on a TLS connection."""
        sock = self.socket
        if self._pushback:
            return self.recv(nr_bytes)
        if sock is None or isinstance(sock, ssl.SSLSocket):
            return bytearray()
        buffer = bytearray(nr_bytes)
        try:
            got = sock.recv_into(buffer, nr_bytes, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return bytearray()
        if got == 0:
            return bytearray()            # closed: pynetdicom's loop sees it next
        return self._fill(buffer, got)

    def recv(self, nr_bytes: int) -> bytearray:
        if self._pushback:
            head, self._pushback = self._pushback[:nr_bytes], self._pushback[nr_bytes:]
            rest = self.recv(nr_bytes - len(head)) if len(head) < nr_bytes else bytearray()
            return bytearray(head) + rest
        if nr_bytes > BULK_READ_MAX:
            return super().recv(nr_bytes)
        return self._fill(bytearray(nr_bytes), 0)

    def _fill(self, buffer: bytearray, done: int) -> bytearray:
        """Read into ``buffer`` after its first ``done`` bytes until it is full (shorter
        only when the peer closed the connection)."""
        sock = cast(socket.socket, self.socket)
        with memoryview(buffer) as view:
            while done < len(buffer):
                got = sock.recv_into(view[done:], len(buffer) - done)
                if not got:
                    break
                done += got
        del buffer[done:]
        return buffer


class RememberedRequest(A_ASSOCIATE_RQ):
    """An A-ASSOCIATE-RQ PDU decoded once, with the primitive made from it once; shared by
    every association that sends the same bytes, so never changed after it is made.
    :meth:`to_primitive` gives each association a copy of its own."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.decode(data)
        self._primitive = super().to_primitive()

    def to_primitive(self) -> A_ASSOCIATE:
        return cast(A_ASSOCIATE, _structure_copy(self._primitive))


@functools.lru_cache(maxsize=REMEMBERED_REQUESTS)
def remembered_request(data: bytes) -> RememberedRequest:
    """The decoded A-ASSOCIATE-RQ PDU of these bytes (a bad one raises, and is not kept)."""
    return RememberedRequest(data)


class RememberedAccept(A_ASSOCIATE_AC):
    """An A-ASSOCIATE-AC PDU made from an accept primitive and encoded once; shared by
    every association whose acceptance has the same :func:`accept_key`, so never
    changed after it is made."""

    def __init__(self, primitive: A_ASSOCIATE) -> None:
        super().__init__(primitive)
        self._encoded = super().encode()

    @property
    def pdu_type(self) -> int:
        return _A_ASSOCIATE_AC      # (pynetdicom looks it up by the exact class)

    def encode(self) -> bytes:
        return self._encoded


def accept_key(primitive: A_ASSOCIATE) -> tuple[Any, ...] | None:
    """Everything of an accept primitive that goes into its A-ASSOCIATE-AC PDU, as a
    hashable value; None where an item holds something unhashable (a list: such an
    acceptance is encoded afresh)."""
    try:
        key = (primitive.called_ae_title, primitive.calling_ae_title,
               primitive.application_context_name,
               tuple((cx.context_id, cx.result, tuple(cx.transfer_syntax[:1]))
                     for cx in primitive.presentation_context_definition_results_list),
               tuple((type(item), tuple(sorted(vars(item).items())))
                     for item in primitive.user_information))
        hash(key)
    except TypeError:
        return None
    return key


_V = TypeVar("_V")
_Outcome = tuple[list[Any], list[Any]]      # (contexts with their results, role items)


class _Recent(Generic[_V]):
    """A bounded map keeping the most recently used values, shared by the association
    threads, with counts of the lookups that found one (hits) and did not (misses)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._values: OrderedDict[tuple[Any, ...], _V] = OrderedDict()
        self.hits = self.misses = 0

    def _get(self, key: tuple[Any, ...]) -> _V | None:
        with self._lock:
            value = self._values.get(key)
            if value is None:
                self.misses += 1
                return None
            self._values.move_to_end(key)
            self.hits += 1
            return value

    def _put(self, key: tuple[Any, ...], value: _V) -> None:
        with self._lock:
            self._values[key] = value
            if len(self._values) > self._size:
                self._values.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self.hits = self.misses = 0


class _Accepts(_Recent[RememberedAccept]):
    """The remembered acceptances (one per sender's configuration)."""

    def pdu(self, primitive: A_ASSOCIATE) -> A_ASSOCIATE_AC:
        key = accept_key(primitive)
        if key is None:
            return A_ASSOCIATE_AC(primitive)
        pdu = self._get(key)
        if pdu is None:
            pdu = RememberedAccept(primitive)
            self._put(key, pdu)
        return pdu


remembered_accepts = _Accepts(REMEMBERED_REQUESTS)


class _Negotiations(_Recent[_Outcome]):
    """Outcomes of pynetdicom's ``negotiate_unrestricted`` by what they depend on: the
    proposed contexts (after EVT_REQUESTED handlers such as adapters/dimse.py's
    ``_prefer_decodable`` reordered their syntaxes), the supported ones and the requested
    roles. Every caller gets a copy of its own."""

    def negotiate(self, rq_contexts: list[Any], ac_contexts: list[Any],
                  roles: dict[Any, Any] | None = None) -> _Outcome:
        roles = roles or {}
        try:
            key = (tuple((cx.context_id, cx.abstract_syntax, tuple(cx.transfer_syntax),
                          cx.scu_role, cx.scp_role) for cx in rq_contexts),
                   tuple((cx.abstract_syntax, tuple(cx.transfer_syntax), cx.scu_role,
                          cx.scp_role) for cx in ac_contexts),
                   tuple(sorted(roles.items())))
            hash(key)
        except TypeError:
            return _NEGOTIATE_UNRESTRICTED(rq_contexts, ac_contexts, roles)
        outcome = self._get(key)
        if outcome is None:
            result, role_items = _NEGOTIATE_UNRESTRICTED(rq_contexts, ac_contexts, roles)
            outcome = (list(result), list(role_items))
            self._put(key, outcome)
        return _structure_copy(outcome[0]), _structure_copy(outcome[1])

    def install(self) -> None:
        """Answer pynetdicom's acceptor negotiation (unrestricted storage) from here."""
        acse.negotiate_unrestricted = self.negotiate  # type: ignore[attr-defined]


_NEGOTIATE_UNRESTRICTED = presentation.negotiate_unrestricted
remembered_negotiations = _Negotiations(REMEMBERED_REQUESTS)


class AcceptingStateMachine(StateMachine):
    """pynetdicom's state machine, but for action AE-7 (Sta3 + Evt7: the local user
    accepted the association), which sends the PDU of :data:`remembered_accepts` for
    the primitive. The rest of what pynetdicom's ``do_action`` does for an action is
    done the same way: the FSM-transition event, the next state, and on an exception
    the log and the end of the association."""

    def do_action(self, event: str) -> None:
        if event != _EVT7 or self.current_state != _STA3:
            super().do_action(event)
            return
        try:
            primitive = cast(A_ASSOCIATE, self.dul.to_provider_queue.get(False))
            self.dul._send(remembered_accepts.pdu(primitive))
            next_state = "Sta6"
            evt.trigger(self.dul.assoc, evt.EVT_FSM_TRANSITION,
                        {"action": "AE-7", "current_state": self.current_state,
                         "fsm_event": event, "next_state": next_state})
            self.transition(next_state)
        except Exception:
            log.exception("State Machine received an exception attempting to perform the "
                          "action 'AE-7' while in state '%s'", self.current_state)
            self.dul.kill_dul()


_SHARED_VALUES = (str, bytes, int, float, tuple, type(None))   # str: UIDs and AE titles


def _structure_copy(value: Any) -> Any:
    """A copy of a primitive in which every list and object is new and the values
    (strings, UIDs, numbers) are shared. Unlike copy.deepcopy, it never runs
    pynetdicom's setters or UID() again, which are what made the decoding slow."""
    if isinstance(value, _SHARED_VALUES):
        return value
    if isinstance(value, list):
        return [_structure_copy(item) for item in value]
    if isinstance(value, dict):
        return {key: _structure_copy(item) for key, item in value.items()}
    if not hasattr(value, "__dict__"):
        return copy.deepcopy(value)
    new = copy.copy(value)
    fields = vars(new)
    for name, item in fields.items():
        if not isinstance(item, _SHARED_VALUES):
            fields[name] = _structure_copy(item)
    return new


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
