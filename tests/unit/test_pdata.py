"""adapters/pdata.py: the P-DATA reader of the C-STORE fast path.

The messages are encoded by pynetdicom's own DIMSE encoder, and what the reader hands back
to pynetdicom is decoded by pynetdicom's own DIMSE decoder: both ends are the real thing,
only the receiver behind the reader records what it is given.
"""

from __future__ import annotations

import os
import struct
from io import BytesIO
from typing import Any

import pytest
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from adapters.pdata import (
    HANDLER_FAILED,
    MalformedPdu,
    PDataReader,
    StoreRequest,
    p_data,
    parse_command,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


class _Context:
    def __init__(self, transfer_syntax: str) -> None:
        self.transfer_syntax = [transfer_syntax]


class _Assoc:
    _accepted_cx = {1: _Context(EXPLICIT), 3: _Context("1.2.840.10008.1.2")}


class _Instance:
    def __init__(self, fail_on_add: bool = False) -> None:
        self.fragments: list[bytes] = []
        self.finished = self.abandoned = False
        self.fail_on_add = fail_on_add
        self.responses_seen: int | None = None    # responses sent when responded() came
        self.rig: _Rig | None = None

    def add(self, fragment: memoryview) -> None:
        if self.fail_on_add:
            raise OSError("simulated handler failure")
        self.fragments.append(bytes(fragment))

    def finish(self) -> int:
        self.finished = True
        return 0x0000

    def abandon(self) -> None:
        self.abandoned = True

    def responded(self) -> None:
        assert self.rig is not None
        self.responses_seen = len(self.rig.responses)


class _Store:
    def __init__(self, rig: _Rig, **instance: bool) -> None:
        self.requests: list[StoreRequest] = []
        self.instances: list[_Instance] = []
        self._instance = instance
        self._rig = rig

    def open_direct(self, assoc: Any, request: StoreRequest) -> _Instance:
        self.requests.append(request)
        self.instances.append(_Instance(**self._instance))
        self.instances[-1].rig = self._rig
        return self.instances[-1]


class _Rig:
    """A reader whose pynetdicom side is pynetdicom's DIMSE message decoder."""

    def __init__(self, *, may_serve: bool = True, **instance: bool) -> None:
        self.store = _Store(self, **instance)
        self.message: DIMSEMessage | None = None
        self.decoded: list[Any] = []          # messages pynetdicom completed
        self.handed: list[tuple[int, bytes]] = []
        self.responses: list[tuple[int, int, str, str, int]] = []
        self.may_serve = may_serve
        self.reader = PDataReader(_Assoc(), self.store, to_pynetdicom=self._to_pynetdicom,
                                  pynetdicom_busy=lambda: self.message is not None,
                                  may_serve_now=lambda: self.may_serve,
                                  respond=lambda *a: self.responses.append(a))

    def _to_pynetdicom(self, context_id: int, value: bytes) -> None:
        self.handed.append((context_id, value))
        if self.message is None:
            self.message = DIMSEMessage()
        if self.message.decode_msg(p_data(context_id, value)):
            self.decoded.append(self.message)
            self.message = None

    def feed(self, *items: tuple[int, bytes]) -> None:
        """One P-DATA-TF PDU's variable part with these (context ID, PDV value) items."""
        self.reader.feed(memoryview(b"".join(
            struct.pack(">IB", len(value) + 1, cx) + value for cx, value in items)))


def _store_pdvs(message_id: int, dataset: bytes, *, max_pdu: int = 4096,
                context_id: int = 1) -> list[tuple[int, bytes]]:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{message_id}"
    primitive.Priority = 2
    primitive.DataSet = BytesIO(dataset)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return [item for pdata in message.encode_msg(context_id, max_pdu)
            for item in pdata.presentation_data_value_list]


def _echo_pdvs(message_id: int) -> list[tuple[int, bytes]]:
    primitive = C_ECHO()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return [item for pdata in message.encode_msg(1, 16384)
            for item in pdata.presentation_data_value_list]


def test_a_c_store_is_read_here_fragment_by_fragment() -> None:
    rig = _Rig()
    dataset = os.urandom(20000)
    pdvs = _store_pdvs(7, dataset, max_pdu=4096)
    assert len(pdvs) > 5                              # the data set really is fragmented
    waiting = []
    for item in pdvs:                                 # one PDV per PDU, as dcmtk sends
        rig.feed(item)
        waiting.append(rig.reader.mid_data_set)
    assert rig.handed == [] and rig.decoded == []     # pynetdicom saw nothing of it
    (request,) = rig.store.requests
    assert request == StoreRequest(1, EXPLICIT, 7, CT, "1.2.826.0.1.3680043.8.498.7", None)
    # waiting for more data set from the command on, until the last fragment
    commands = sum(1 for cx, value in pdvs if value[0] & 0x01)
    assert waiting == [False] * (commands - 1) + [True] * (len(pdvs) - commands) + [False]
    (instance,) = rig.store.instances
    assert b"".join(instance.fragments) == dataset and instance.finished
    assert rig.responses == [(1, 7, CT, "1.2.826.0.1.3680043.8.498.7", 0x0000)]
    assert instance.responses_seen == 1               # told once its response was out


def test_several_items_in_one_pdu_and_a_command_in_two_fragments() -> None:
    rig = _Rig()
    dataset = os.urandom(3000)
    pdvs = _store_pdvs(2, dataset, max_pdu=1024, context_id=3)
    (cx, command), *data = pdvs
    assert command[0] == 0x03                          # a whole command in one PDV
    half = len(command) // 2                           # now split it in two fragments
    rig.feed((cx, b"\x01" + command[1:half]))
    rig.feed((cx, b"\x03" + command[half:]), *data[:2])
    rig.feed(*data[2:])
    assert rig.store.requests[0].transfer_syntax == "1.2.840.10008.1.2"
    assert b"".join(rig.store.instances[0].fragments) == dataset
    assert rig.responses and rig.responses[0][:2] == (3, 2)


def test_other_messages_reach_pynetdicom_as_they_came() -> None:
    rig = _Rig()
    echo = _echo_pdvs(5)
    dataset = os.urandom(5000)
    store = _store_pdvs(6, dataset)
    rig.feed(*echo)
    for item in store:
        rig.feed(item)
    assert rig.handed == echo                          # byte for byte
    (message,) = rig.decoded
    assert isinstance(message, C_ECHO_RQ) and message.command_set.MessageID == 5
    assert len(rig.store.requests) == 1                # the C-STORE after it: read here
    assert b"".join(rig.store.instances[0].fragments) == dataset


def test_a_c_store_that_may_not_be_served_now_goes_to_pynetdicom_whole() -> None:
    rig = _Rig(may_serve=False)
    dataset = os.urandom(9000)
    pdvs = _store_pdvs(9, dataset)
    for item in pdvs:
        rig.feed(item)
    assert rig.store.requests == [] and rig.responses == []
    assert rig.handed == pdvs
    (message,) = rig.decoded
    assert isinstance(message, C_STORE_RQ) and message.data_set.getvalue() == dataset
    rig.may_serve = True                               # the next one is read here again
    for item in _store_pdvs(10, dataset):
        rig.feed(item)
    assert [r.message_id for r in rig.store.requests] == [10]


def test_a_failing_receiver_is_answered_with_a_failure_and_the_rest_is_consumed() -> None:
    rig = _Rig(fail_on_add=True)
    for item in _store_pdvs(4, os.urandom(9000)):
        rig.feed(item)
    assert rig.responses == [(1, 4, CT, "1.2.826.0.1.3680043.8.498.4", HANDLER_FAILED)]
    assert rig.store.instances[0].abandoned
    for item in _store_pdvs(5, os.urandom(100)):     # the association goes on
        rig.feed(item)
    assert rig.responses[-1][1] == 5


def test_an_association_ending_mid_data_set_abandons_the_instance() -> None:
    rig = _Rig()
    for item in _store_pdvs(1, os.urandom(9000))[:-1]:
        rig.feed(item)
    rig.reader.close()
    assert rig.store.instances[0].abandoned and not rig.store.instances[0].finished
    assert rig.responses == []


@pytest.mark.parametrize("body", [
    b"",                                               # no items
    struct.pack(">IBB", 10, 1, 0x03) + b"abc",         # item longer than the PDU
    struct.pack(">IB", 1, 1),                          # item too short for its header
    struct.pack(">IBB", 4, 1, 0x00) + b"xy",           # data set fragment, no command
])
def test_malformed_items_are_an_invalid_pdu(body: bytes) -> None:
    with pytest.raises(MalformedPdu):
        _Rig().reader.feed(memoryview(body))


def test_a_command_inside_a_data_set_is_an_invalid_pdu() -> None:
    rig = _Rig()
    pdvs = _store_pdvs(1, os.urandom(9000))
    rig.feed(pdvs[0], pdvs[1])
    with pytest.raises(MalformedPdu):
        rig.feed(pdvs[0])


def test_parse_command_reads_group_0000_and_nothing_else() -> None:
    (_, command), *_ = _store_pdvs(3, b"xy")
    fields = parse_command(command[1:])
    assert fields is not None
    assert struct.unpack("<H", fields[0x0100])[0] == 0x0001          # C-STORE-RQ
    assert fields[0x1000].rstrip(b"\0") == b"1.2.826.0.1.3680043.8.498.3"
    assert parse_command(command[1:-1]) is None                     # truncated
    assert parse_command(b"\x08\x00\x16\x00\x02\x00\x00\x00ab") is None  # group 0008
