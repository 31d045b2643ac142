"""What adapters/reactor.py encodes and reads by hand is what pynetdicom itself would send
and read: the C-STORE-RSP, its P-DATA-TF PDU, the bulk socket read."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.sop_class import Verification
from pynetdicom import AE
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from adapters.reactor import BulkReadSocket, c_store_success_command, p_data_tf
from node.app import Node
from node.settings import load_settings
from node.synth import SeriesSpec, iter_datasets, make_study
from tests.support import write_config


def _response(message_id: int, sop_class: str, sop_instance: str, status: int) -> C_STORE:
    rsp = C_STORE()   # as pynetdicom's StorageServiceClass fills it in
    rsp.MessageID = message_id
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    return rsp


def _pynetdicom_bytes(primitive: C_STORE) -> list[tuple[int, bytes]]:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return [item for pdata in message.encode_msg(1, 16384)
            for item in pdata.presentation_data_value_list]


@pytest.mark.parametrize(("message_id", "sop_class", "sop_instance"), [
    (1, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"),                           # even, even
    (65535, "1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.123"),  # odd length
    (300, "1.2.840.10008.5.1.4.1.1.66.4", "2.25." + "9" * 59),              # 64 chars
])
def test_success_response_is_byte_for_byte_pynetdicoms(message_id: int, sop_class: str,
                                                       sop_instance: str) -> None:
    primitive = _response(message_id, sop_class, sop_instance, 0x0000)
    command = c_store_success_command(primitive)
    assert command is not None
    assert [(1, b"\x03" + command)] == _pynetdicom_bytes(primitive)


def test_anything_but_a_plain_success_is_left_to_pynetdicom() -> None:
    assert c_store_success_command(_response(1, "1.2.3", "1.2.4", 0xA700)) is None
    request = _response(1, "1.2.3", "1.2.4", 0x0000)
    request.MessageIDBeingRespondedTo = None
    assert c_store_success_command(request) is None
    commented = _response(1, "1.2.3", "1.2.4", 0x0000)
    commented.ErrorComment = "kept, but see the log"
    assert c_store_success_command(commented) is None


def test_a_real_association_answers_with_the_pre_encoded_response(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shortcut must be taken on the node's own associations, not only exist: C-STORE
    responses never reach pynetdicom's encoder, and the sender still reads Success."""
    through_pynetdicom: list[str] = []
    original = DIMSEServiceProvider.send_msg

    def spy(self: DIMSEServiceProvider, primitive: object, context_id: int) -> None:
        if getattr(primitive, "MessageIDBeingRespondedTo", None) is not None:  # replies only
            through_pynetdicom.append(type(primitive).__name__)
        original(self, primitive, context_id)

    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", spy)
    study = make_study(SeriesSpec(modality="CT", slices=3, rows=32, columns=32), seed=3)
    datasets = list(iter_datasets(study))
    config = write_config(tmp_path / "cfg")
    node = Node(load_settings(config), spawn_worker=False)
    node.start()
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title="PACSNODE")
        assert assoc.is_established
        try:
            statuses = [assoc.send_c_store(ds).Status for ds in datasets]
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
    finally:
        node.stop()
    assert statuses == [0x0000] * 3
    assert "C_STORE" not in through_pynetdicom
    assert "C_ECHO" in through_pynetdicom     # the spy does see the node's other replies


@pytest.mark.parametrize("size", [0, 1, 200, 70000])
def test_p_data_tf_is_pynetdicoms_pdu(size: int) -> None:
    value = b"\x03" + bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    primitive = P_DATA()
    primitive.presentation_data_value_list.append((7, value))
    assert p_data_tf(7, value) == P_DATA_TF(primitive).encode()


def _bulk(sock: socket.socket) -> BulkReadSocket:
    wrapper = object.__new__(BulkReadSocket)   # only .socket is used by recv
    wrapper.socket = sock
    return wrapper


def test_bulk_read_waits_for_every_byte_asked_for() -> None:
    a, b = socket.socketpair()
    with a, b:
        data = bytes(range(256)) * 2048          # 512 KiB, more than one socket buffer
        sender = threading.Thread(target=lambda: [a.sendall(data[i:i + 1000])
                                                  for i in range(0, len(data), 1000)])
        sender.start()
        got = _bulk(b).recv(len(data) - 10)
        rest = _bulk(b).recv(10)
        sender.join()
        assert bytes(got) == data[:-10] and bytes(rest) == data[-10:]
        assert isinstance(got, bytearray)


def test_bulk_read_returns_what_came_when_the_peer_closes() -> None:
    a, b = socket.socketpair()
    with b:
        a.sendall(b"half a PDU")
        a.close()
        assert _bulk(b).recv(100) == bytearray(b"half a PDU")
        assert _bulk(b).recv(100) == bytearray()


def test_bulk_read_lets_a_timeout_through() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(0.05)
        a.sendall(b"abc")
        with pytest.raises(TimeoutError):
            _bulk(b).recv(10)


def test_recv_arrived_reads_only_what_has_begun_to_arrive() -> None:
    a, b = socket.socketpair()
    with a, b:
        bulk = _bulk(b)
        started = time.monotonic()
        assert bulk.recv_arrived(6) == bytearray()          # nothing yet: at once
        assert time.monotonic() - started < 0.5
        a.sendall(b"\x04\x00")                              # two of six bytes so far
        threading.Timer(0.05, lambda: a.sendall(b"\x00\x00\x00\x10")).start()
        assert bulk.recv_arrived(6) == bytearray(b"\x04\x00\x00\x00\x00\x10")  # waits
        bulk.unread(b"\x07xyz")
        assert bulk.recv_arrived(2) == bytearray(b"\x07x")   # given back first
        assert bulk.recv(2) == bytearray(b"yz")
        a.close()
        assert bulk.recv_arrived(6) == bytearray()          # closed: left to the loop
