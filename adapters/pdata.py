"""C-STORE requests read straight from the P-DATA-TF PDUs, on the DUL thread.

pynetdicom turns every P-DATA-TF PDU into objects: the PDU bytes are copied, decoded into
a PDU object with a copy of each value, passed as an event through the state machine,
turned into a primitive, and each fragment is copied again into the DIMSE message; the
command set is decoded with pydicom, the message turned into a primitive, handed to a
service class, to an event, to our handler, which copies the data set out once more.
For a 512×512 CT slice that is ~1 ms of Python and five copies of half a megabyte, on
every instance's critical path.

:class:`PDataReader` takes the P-DATA-TF PDUs of an established association (state Sta6)
off pynetdicom's hands: it walks the presentation data value items itself and, for a
C-STORE request that may be served at once (:meth:`WaitingDIMSE.may_serve_now
<adapters.reactor.WaitingDIMSE.may_serve_now>`: the association thread has nothing
queued or in hand), gives each data set fragment, a view of the received PDU, to the
receiver as it arrives (:meth:`DirectStore.open_direct`): the receiver writes and hashes
it while the sender is still sending the next, so that after the last fragment only the
fsync, rename and index are left before the response. Every other message (C-ECHO,
C-FIND, anything unusual, a C-STORE while another request is still being served) is
handed, fragment by fragment, to pynetdicom's DIMSE provider exactly as its DT-2 action
would hand it, so pynetdicom decodes, serves and orders it as always. PDUs of any other
type are never touched.

Malformed items are what pynetdicom calls an invalid PDU: event Evt19, which aborts the
association (PS3.8 9.3.1, state machine action AA-8).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

C_STORE_RQ = 0x0001
NO_DATA_SET = 0x0101
# What pynetdicom answers when a C-STORE handler raises (PS3.4 B.2.3: "Cannot understand"
# range, pynetdicom's choice of code).
HANDLER_FAILED = 0xC211


class MalformedPdu(Exception):
    """The PDU's items do not add up (PS3.8 9.3.5)."""


@dataclass(frozen=True)
class StoreRequest:
    """The fields of a C-STORE-RQ command as received."""
    context_id: int
    transfer_syntax: str
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    move_originator_ae: str | None


class DirectInstance(Protocol):
    """An instance the receiver takes as its data set arrives."""

    def add(self, fragment: memoryview) -> None:
        """The next data set fragment (a view of the received PDU; not copied)."""

    def finish(self) -> int:
        """All fragments are in: store, and return the C-STORE response status."""

    def abandon(self) -> None:
        """The association ended before the last fragment."""

    def responded(self) -> None:
        """The response is out; work that can wait for the sender's next request (keeping
        a temporary file ready) goes here."""


@runtime_checkable
class DirectStore(Protocol):
    """What the bound EVT_C_STORE handler offers when it can take a request without
    pynetdicom's event (adapters/dimse.py's receiver does)."""

    def open_direct(self, assoc: Any, request: StoreRequest) -> DirectInstance:
        """An instance to receive the request's data set into."""


def parse_command(data: bytes | memoryview) -> dict[int, bytes] | None:
    """A command set (group 0000, Implicit VR Little Endian, PS3.7 6.3) as element →
    value bytes; None when it is not a well-formed one."""
    fields: dict[int, bytes] = {}
    view = memoryview(data)
    offset, end = 0, len(view)
    while offset + 8 <= end:
        group, element, length = struct.unpack_from("<HHI", view, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            return None
        fields[element] = bytes(view[offset:offset + length])
        offset += length
    return fields if offset == end else None


def _us(fields: dict[int, bytes], element: int) -> int | None:
    value = fields.get(element)
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


def _text(fields: dict[int, bytes], element: int) -> str | None:
    value = fields.get(element)
    if value is None:
        return None
    try:
        return value.decode("ascii").rstrip("\0 ").strip()
    except UnicodeDecodeError:
        return None


class PDataReader:
    """The P-DATA side of one association's DUL (see the module docstring).

    ``to_pynetdicom(context_id, value)`` gives one presentation data value to pynetdicom's
    DIMSE provider; ``pynetdicom_busy()`` says whether it holds a partial message;
    ``may_serve_now()`` whether a C-STORE may be served here now; ``respond(context_id,
    message_id, sop_class, sop_instance, status)`` sends the C-STORE response.
    """

    def __init__(self, assoc: Any, store: DirectStore, *,
                 to_pynetdicom: Callable[[int, bytes], None],
                 pynetdicom_busy: Callable[[], bool],
                 may_serve_now: Callable[[], bool],
                 respond: Callable[[int, int, str, str, int], None]) -> None:
        self.assoc = assoc
        self.store = store
        self._to_pynetdicom = to_pynetdicom
        self._pynetdicom_busy = pynetdicom_busy
        self._may_serve_now = may_serve_now
        self._respond = respond
        self._command: list[bytes] = []          # PDVs of a command not yet decided
        self._command_context: int | None = None
        self._request: StoreRequest | None = None   # the C-STORE read here, and
        self._instance: DirectInstance | None = None  # where its data set goes
        self._slow = False                       # the current message is pynetdicom's

    @property
    def mid_data_set(self) -> bool:
        """A C-STORE read here still waits for data set fragments: the peer's next PDU is
        for it (unless the peer gives up: then it is an A-ABORT or A-RELEASE)."""
        return self._request is not None

    def feed(self, body: memoryview) -> None:
        """The variable part of one P-DATA-TF PDU (after its 6-byte header)."""
        offset, end = 0, len(body)
        if end == 0:
            raise MalformedPdu("a P-DATA-TF PDU without items")
        while offset < end:
            if offset + 6 > end:
                raise MalformedPdu("a truncated presentation data value item")
            length = struct.unpack_from(">I", body, offset)[0]
            if length < 2 or offset + 4 + length > end:
                raise MalformedPdu(f"a presentation data value item of length {length}")
            self._value(body[offset + 4], body[offset + 6:offset + 4 + length],
                        body[offset + 5:offset + 4 + length])
            offset += 4 + length

    def _value(self, context_id: int, fragment: memoryview, value: memoryview) -> None:
        """One PDV: ``value`` is its message control header and fragment."""
        control = value[0]
        if self._slow or (self._pynetdicom_busy() and not self._command
                          and self._request is None):
            self._hand_over(context_id, value)
            return
        if self._request is not None:                  # a C-STORE data set, ours
            if control & 0x01 or context_id != self._request.context_id:
                raise MalformedPdu("a command or another context inside a data set")
            self._add(fragment)
            if control & 0x02:
                self._finish_store()
            return
        if not control & 0x01:
            raise MalformedPdu("a data set fragment where a command was expected")
        if self._command and context_id != self._command_context:
            raise MalformedPdu("command fragments on two presentation contexts")
        self._command.append(bytes(value))
        self._command_context = context_id
        if control & 0x02:
            self._decide(context_id)

    def _decide(self, context_id: int) -> None:
        """A whole command has arrived: read the C-STORE here, or give it to pynetdicom."""
        fields = parse_command(b"".join(v[1:] for v in self._command))
        request = self._store_request(context_id, fields) if fields is not None else None
        if request is not None and self._may_serve_now():
            self._command.clear()
            self._request = request
            self._instance = None
            try:
                self._instance = self.store.open_direct(self.assoc, request)
            except Exception:
                log.exception("C-STORE handler failed; answering 0x%04X", HANDLER_FAILED)
            return
        pending, self._command = self._command, []
        for value in pending:
            self._hand_over(context_id, value)

    def _store_request(self, context_id: int, fields: dict[int, bytes]) -> StoreRequest | None:
        """The C-STORE-RQ's fields, or None for any other message or anything unusual."""
        if _us(fields, 0x0100) != C_STORE_RQ or _us(fields, 0x0800) in (None, NO_DATA_SET):
            return None
        message_id = _us(fields, 0x0110)
        sop_class, sop_instance = _text(fields, 0x0002), _text(fields, 0x1000)
        context = self.assoc._accepted_cx.get(context_id)
        if message_id is None or not sop_class or not sop_instance or context is None:
            return None
        return StoreRequest(context_id, str(context.transfer_syntax[0]), message_id, sop_class,
                            sop_instance, _text(fields, 0x1030) or None)

    def _add(self, fragment: memoryview) -> None:
        if self._instance is None:
            return                                  # failed to open: answered at the end
        try:
            self._instance.add(fragment)
        except Exception:
            log.exception("C-STORE handler failed; answering 0x%04X", HANDLER_FAILED)
            self._drop_instance()

    def _finish_store(self) -> None:
        request, self._request = self._request, None
        instance, self._instance = self._instance, None
        assert request is not None
        status = HANDLER_FAILED
        if instance is not None:
            try:
                status = instance.finish()
            except Exception:
                log.exception("C-STORE handler failed; answering 0x%04X", HANDLER_FAILED)
                instance.abandon()
        self._respond(request.context_id, request.message_id, request.sop_class_uid,
                      request.sop_instance_uid, status)
        if instance is not None:
            try:
                instance.responded()
            except Exception:
                log.exception("C-STORE handler failed after its response")

    def close(self) -> None:
        """The association is over: a data set still arriving never will."""
        self._request = None
        self._drop_instance()

    def _drop_instance(self) -> None:
        instance, self._instance = self._instance, None
        if instance is not None:
            try:
                instance.abandon()
            except Exception:
                log.exception("abandoning a partly received instance failed")

    def _hand_over(self, context_id: int, value: memoryview | bytes) -> None:
        self._to_pynetdicom(context_id, bytes(value))
        self._slow = self._pynetdicom_busy()      # its message is complete once it is idle


def p_data(context_id: int, value: bytes) -> P_DATA:
    """A P-DATA primitive of one presentation data value, as pynetdicom's DT-2 passes on."""
    primitive = P_DATA()
    primitive.presentation_data_value_list.append((context_id, value))
    return primitive
