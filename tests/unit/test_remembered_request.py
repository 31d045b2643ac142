"""adapters/reactor.py's remembered A-ASSOCIATE-RQ: the same primitive as pynetdicom's own
decoding, a copy per association that shares nothing changeable, and real associations
that use it (a second association with the same request is not decoded again); and its
remembered A-ASSOCIATE-AC: the same bytes as pynetdicom's own encoding, sent again to a
second association accepted the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom import AE, build_context
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.presentation import PresentationContext, negotiate_unrestricted
from sqlalchemy import select
from sqlalchemy.orm import Session
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)

from adapters.reactor import (
    RememberedAccept,
    RememberedRequest,
    _Negotiations,
    accept_key,
    remembered_accepts,
    remembered_negotiations,
    remembered_request,
)
from node.app import Node
from node.db import SeriesRow
from node.settings import load_settings
from node.synth import SeriesSpec, make_study, write_study
from tests.support import write_config

_LEAVES = (str, bytes, int, float, tuple, type(None))


def _required_items() -> list[Any]:
    """The user information items every request and acceptance carries."""
    length = MaximumLengthNotification()
    length.maximum_length_received = 262144
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.9999.1"
    return [length, implementation]


def _request_bytes(calling: str = "MODALITY") -> bytes:
    """An A-ASSOCIATE-RQ with every kind of item pynetdicom decodes."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = "PACSNODE"
    contexts = [build_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                               ExplicitVRBigEndian]),
                build_context(MRImageStorage, [ImplicitVRLittleEndian])]
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    primitive.presentation_context_definition_list = contexts
    items = _required_items()
    item: Any
    item = ImplementationVersionNameNotification()
    item.implementation_version_name = "TEST_1"
    items.append(item)
    item = SCP_SCU_RoleSelectionNegotiation()
    item.sop_class_uid, item.scu_role, item.scp_role = CTImageStorage, True, True
    items.append(item)
    item = AsynchronousOperationsWindowNegotiation()
    item.maximum_number_operations_invoked = 2
    item.maximum_number_operations_performed = 3
    items.append(item)
    item = UserIdentityNegotiation()
    item.user_identity_type, item.primary_field = 1, b"radiology"
    items.append(item)
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid, item.service_class_application_information = MRImageStorage, b"\x01\x00"
    items.append(item)
    item = SOPClassCommonExtendedNegotiation()
    item.sop_class_uid = CTImageStorage
    item.service_class_uid = "1.2.840.10008.4.2"
    item.related_general_sop_class_identification = ["1.2.840.10008.5.1.4.1.1.2.1"]
    items.append(item)
    primitive.user_information = items
    return bytes(A_ASSOCIATE_RQ(primitive).encode())


def _accept(calling: str = "MODALITY", *, result: int = 0, common: bool = False) -> A_ASSOCIATE:
    """An accept primitive as pynetdicom's ACSE makes one (send_accept)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, "PACSNODE"
    primitive.result, primitive.result_source = 0, 1
    results = []
    for context_id, syntax, outcome in ((1, ExplicitVRLittleEndian, 0),
                                        (3, ImplicitVRLittleEndian, result)):
        cx = PresentationContext()
        cx.context_id, cx.result = context_id, outcome
        cx.abstract_syntax = CTImageStorage
        cx.add_transfer_syntax(syntax)
        results.append(cx)
    primitive.presentation_context_definition_results_list = results
    items = _required_items()
    item: Any
    if common:      # (an acceptor never sends this item; it holds a list)
        item = SOPClassCommonExtendedNegotiation()
        item.sop_class_uid, item.service_class_uid = CTImageStorage, "1.2.840.10008.4.2"
        item.related_general_sop_class_identification = ["1.2.840.10008.5.1.4.1.1.2.1"]
        items.append(item)
    primitive.user_information = items
    return primitive


def test_a_remembered_accept_is_pynetdicoms_own_encoding() -> None:
    own = bytes(A_ASSOCIATE_AC(_accept()).encode())
    assert RememberedAccept(_accept()).encode() == own
    assert own[:1] == b"\x02" and b"1.2.826.0.1.3680043.9.9999.1" in own


def test_accepts_are_told_apart_by_everything_their_pdu_holds() -> None:
    key = accept_key(_accept())
    assert key is not None and key == accept_key(_accept())
    assert accept_key(_accept("OTHER")) != key                 # calling AE title
    assert accept_key(_accept(result=3)) != key                # a context's result
    other_length = _accept()
    other_length.user_information[0].maximum_length_received = 16384
    assert accept_key(other_length) != key
    assert accept_key(_accept(common=True)) is None            # unhashable: never kept
    remembered_accepts.clear()
    first, again = remembered_accepts.pdu(_accept()), remembered_accepts.pdu(_accept())
    assert again is first and (remembered_accepts.misses, remembered_accepts.hits) == (1, 1)
    assert remembered_accepts.pdu(_accept(result=3)) is not first
    fresh = remembered_accepts.pdu(_accept(common=True))
    assert not isinstance(fresh, RememberedAccept)
    assert fresh.encode() == A_ASSOCIATE_AC(_accept(common=True)).encode()


def _shape(value: Any) -> Any:
    """A comparable picture of a primitive: classes and fields, recursively."""
    if isinstance(value, _LEAVES):
        return value
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return (type(value).__name__, {k: _shape(v) for k, v in sorted(vars(value).items())})


def _changeable(value: Any, found: set[int]) -> set[int]:
    """ids of every list and object inside a primitive (its changeable parts)."""
    if isinstance(value, _LEAVES):
        return found
    found.add(id(value))
    for item in value if isinstance(value, list) else vars(value).values():
        _changeable(item, found)
    return found


def test_the_remembered_primitive_is_pynetdicoms_own_decoding() -> None:
    data = _request_bytes()
    own = A_ASSOCIATE_RQ()
    own.decode(data)
    remembered = RememberedRequest(data)
    assert _shape(remembered.to_primitive()) == _shape(own.to_primitive())
    assert bytes(A_ASSOCIATE_RQ(remembered.to_primitive()).encode()) == data   # complete
    assert (remembered.calling_ae_title, remembered.protocol_version) == ("MODALITY", 1)


def test_each_association_gets_a_copy_that_shares_nothing_changeable() -> None:
    remembered = RememberedRequest(_request_bytes())
    first, second = remembered.to_primitive(), remembered.to_primitive()
    assert _changeable(first, set()).isdisjoint(_changeable(second, set()))
    first.presentation_context_definition_list[0].transfer_syntax.append("1.2.3")
    first.user_information.clear()
    assert second.presentation_context_definition_list[0].transfer_syntax == [
        ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
    assert len(second.user_information) == 8


def _proposal(*syntaxes: str) -> list[PresentationContext]:
    contexts = []
    for i, uid in enumerate([CTImageStorage, MRImageStorage, "1.2.3.4.5.6"]):
        cx = PresentationContext()
        cx.context_id = 2 * i + 1
        cx.abstract_syntax = uid
        cx.transfer_syntax = list(syntaxes)
        contexts.append(cx)
    return contexts


def _outcome(result: list[PresentationContext]) -> list[tuple[Any, ...]]:
    return [(cx.context_id, cx.abstract_syntax, cx.transfer_syntax, cx.result, cx.as_scu,
             cx.as_scp) for cx in result]


def test_a_remembered_negotiation_is_pynetdicoms_own_and_each_gets_a_copy() -> None:
    supported = [build_context("1.2.840.10008.1.1")]
    negotiations = _Negotiations(4)
    syntaxes = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
    own, own_roles = negotiate_unrestricted(_proposal(*syntaxes), supported, {})
    first, roles = negotiations.negotiate(_proposal(*syntaxes), supported, {})
    second, _ = negotiations.negotiate(_proposal(*syntaxes), supported, {})
    assert _outcome(first) == _outcome(second) == _outcome(own) and roles == own_roles
    assert (negotiations.misses, negotiations.hits) == (1, 1)
    first[0].transfer_syntax.append("1.2.3")                 # one association's copy
    assert _outcome(negotiations.negotiate(_proposal(*syntaxes), supported, {})[0]) == \
        _outcome(own)
    # another order of syntaxes, or roles asked for, is another negotiation
    other, _ = negotiations.negotiate(_proposal(*reversed(syntaxes)), supported, {})
    assert other[0].transfer_syntax == [ExplicitVRLittleEndian]
    roles_asked = {CTImageStorage: (True, True)}
    _, role_items = negotiations.negotiate(_proposal(*syntaxes), supported, roles_asked)
    assert negotiations.misses == 3
    _, own_items = negotiate_unrestricted(_proposal(*syntaxes), supported, roles_asked)
    assert [(i.sop_class_uid, i.scu_role, i.scp_role) for i in role_items] == \
        [(i.sop_class_uid, i.scu_role, i.scp_role) for i in own_items] != []


def test_requests_are_remembered_by_their_exact_bytes() -> None:
    a, b = _request_bytes("SENDER_A"), _request_bytes("SENDER_B")
    assert remembered_request(a) is remembered_request(a)
    assert remembered_request(b) is not remembered_request(a)
    assert remembered_request(b).to_primitive().calling_ae_title == "SENDER_B"


def test_a_second_association_with_the_same_request_is_not_decoded_again(
        tmp_path: Path) -> None:
    spec = SeriesSpec(slices=2, rows=32, columns=32, pixel_spacing_mm=0.7,
                      slice_thickness_mm=1.0, seed=3)
    study_a = write_study(make_study(spec, seed=3), tmp_path / "a")
    study_b = write_study(make_study(spec, seed=4), tmp_path / "b")
    cfg = write_config(tmp_path / "cfg", storage={
        "spool": str(tmp_path / "spool"), "database": f"sqlite:///{tmp_path}/index.db",
        "min_free_mb": 0})
    node = Node(load_settings(cfg), spawn_worker=False)
    node.start()
    try:
        remembered_request.cache_clear()
        remembered_accepts.clear()
        remembered_negotiations.clear()
        accepted = []
        for calling, path in [("SENDER_C", study_a[0]), ("SENDER_C", study_a[1]),
                              ("SENDER_D", study_b[0])]:
            ae = AE(ae_title=calling)
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            ae.add_requested_context("1.2.840.10008.5.1.4.1.2.1.1")   # C-FIND: not offered
            assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title="PACSNODE")
            assert assoc.is_established
            accepted.append(([(cx.context_id, cx.transfer_syntax[0])
                              for cx in assoc.accepted_contexts],
                             [cx.context_id for cx in assoc.rejected_contexts],
                             assoc.acceptor.maximum_length))
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
            assoc.release()
        info = remembered_request.cache_info()
        assert (info.misses, info.hits) == (2, 1)
        # the second association of SENDER_C got the acceptance sent to the first
        assert (remembered_accepts.misses, remembered_accepts.hits) == (2, 1)
        # the same proposal was negotiated once (whoever sends it)
        assert (remembered_negotiations.misses, remembered_negotiations.hits) == (1, 2)
        assert accepted[0] == accepted[1] == accepted[2] == (
            [(1, ExplicitVRLittleEndian)], [3], node.settings.node.max_pdu_bytes)
        with Session(node.engine) as session:
            callers = {study: caller for study, caller in session.execute(
                select(SeriesRow.study_instance_uid, SeriesRow.calling_ae_title))}
        assert callers == {dcmread(study_a[0]).StudyInstanceUID: "SENDER_C",
                           dcmread(study_b[0]).StudyInstanceUID: "SENDER_D"}
    finally:
        node.stop()
