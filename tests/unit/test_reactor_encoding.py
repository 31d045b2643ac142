"""The hand-encoded C-STORE-RSP (adapters/reactor.py) is what pynetdicom itself sends."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from adapters.reactor import c_store_success_command


def _response(message_id: int, sop_class: str, sop_instance: str, status: int) -> C_STORE:
    rsp = C_STORE()
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
