"""Which transfer syntax the Storage SCP accepts in a presentation context that proposes
several: one this node can decode, in the order the sender proposed them, before any it
cannot (pynetdicom's unrestricted storage service alone takes the first proposed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    MPEG2MPML,
)
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters.dimse import DimseReceiver, decodable, preferred_order
from node.db import InstanceRow
from node.settings import NodeSettings
from tests.support import free_port
from tests.unit.helpers import Rig, small_series

# A private transfer syntax (a UID under a test root): no decoder knows it.
PRIVATE = "1.2.826.0.1.3680043.9.7433.1.99"
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.9.7433.2.1"


@pytest.fixture()
def receiver(tmp_path: Path) -> Iterator[tuple[DimseReceiver, Rig]]:
    rig = Rig(tmp_path)
    receiver = DimseReceiver(NodeSettings(host="127.0.0.1", port=free_port()), rig.intake,
                             on_released=lambda carried: None)
    receiver.start()
    try:
        yield receiver, rig
    finally:
        receiver.stop()


def _accepted(port: int, sop_class: str, syntaxes: list[str]) -> str:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        [context] = assoc.accepted_contexts
        return str(context.transfer_syntax[0])
    finally:
        assoc.release()


def test_the_order_this_node_prefers() -> None:
    assert decodable(ExplicitVRLittleEndian) and decodable(JPEGLSLossless)
    assert not decodable(PRIVATE) and not decodable(MPEG2MPML)
    assert preferred_order([PRIVATE, JPEGLSLossless, MPEG2MPML, ExplicitVRLittleEndian]) \
        == [JPEGLSLossless, ExplicitVRLittleEndian, PRIVATE, MPEG2MPML]


@pytest.mark.parametrize(("proposed", "expected"), [
    # a syntax no model here could read, proposed first: the decodable one is taken
    ([PRIVATE, ExplicitVRLittleEndian], ExplicitVRLittleEndian),
    ([MPEG2MPML, PRIVATE, ImplicitVRLittleEndian], ImplicitVRLittleEndian),
    # among decodable ones the sender's order stands (the instance is kept as sent)
    ([JPEGLSLossless, ExplicitVRLittleEndian], JPEGLSLossless),
    ([ExplicitVRLittleEndian, JPEGLSLossless], ExplicitVRLittleEndian),
    # nothing decodable: accepted as proposed, stored as sent
    ([PRIVATE], PRIVATE),
])
def test_a_decodable_transfer_syntax_is_accepted_first(
        receiver: tuple[DimseReceiver, Rig], proposed: list[str], expected: str) -> None:
    scp, _ = receiver
    assert _accepted(scp.port, CTImageStorage, proposed) == expected


def test_a_private_sop_class_gets_the_same_choice(receiver: tuple[DimseReceiver, Rig]) -> None:
    scp, _ = receiver
    assert _accepted(scp.port, PRIVATE_SOP_CLASS,
                     [PRIVATE, ImplicitVRLittleEndian]) == ImplicitVRLittleEndian


def test_an_instance_sent_in_the_syntax_chosen_is_stored_in_it(
        receiver: tuple[DimseReceiver, Rig]) -> None:
    scp, rig = receiver
    ds = small_series(1, seed=4).datasets[0]
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage, [PRIVATE, ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status is not None and status.Status == 0x0000
    with Session(rig.engine) as session:
        row = session.scalars(select(InstanceRow).where(
            InstanceRow.sop_instance_uid == ds.SOPInstanceUID)).one()
    assert row.transfer_syntax_uid == ExplicitVRLittleEndian
