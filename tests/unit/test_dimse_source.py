"""The DIMSE source against a small pynetdicom Query/Retrieve SCP on loopback, for the
answers Orthanc does not give on demand: failure statuses, failed sub-operations, an
unknown move destination, a PACS that does not answer in time."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated names
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from adapters.dimse_source import DimseSource
from node.errors import SourceError
from node.settings import SourceSettings
from tests.support import free_port
from tests.unit.helpers import small_series

Handler = Callable[[Any], Iterator[Any]]


@pytest.fixture
def pacs() -> Iterator[Callable[..., SourceSettings]]:
    servers: list[Any] = []

    def start(handlers: list[tuple[Any, Handler]], **extra: Any) -> SourceSettings:
        ae = AE(ae_title="QRSCP")
        for uid in (StudyRootQueryRetrieveInformationModelFind,
                    StudyRootQueryRetrieveInformationModelGet,
                    StudyRootQueryRetrieveInformationModelMove):
            ae.add_supported_context(uid)
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, scu_role=True, scp_role=True)
        port = free_port()
        servers.append(ae.start_server(("127.0.0.1", port), block=False,
                                       evt_handlers=handlers))
        return SourceSettings(name="pacs", kind="dimse", ae_title="QRSCP", host="127.0.0.1",
                              port=port, timeout_seconds=extra.pop("timeout_seconds", 5),
                              **extra)

    yield start
    for server in servers:
        server.shutdown()


def _answer(study: str, series: str, count: int) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.NumberOfSeriesRelatedInstances = count
    ds.StudyDate = "20260101"
    return ds


def test_c_find_answers_become_remote_series_and_the_query_carries_the_filters(
        pacs: Callable[..., SourceSettings]) -> None:
    seen: list[Dataset] = []

    def on_find(event: Any) -> Iterator[Any]:
        seen.append(event.identifier)
        yield 0xFF00, _answer("1.2.3", "1.2.3.1", 12)
        yield 0xFF00, _answer("1.2.3", "1.2.3.2", 3)

    source = pacs([(evt.EVT_C_FIND, on_find)], filters={"Modality": "CT"})
    found = DimseSource().find_series(source, since=None, extra={"PatientID": "SYN000001"})
    assert [(r.series_instance_uid, r.instances, r.study_date) for r in found] == [
        ("1.2.3.1", 12, "20260101"), ("1.2.3.2", 3, "20260101")]
    query = seen[0]
    assert (query.QueryRetrieveLevel, query.Modality, query.PatientID) == (
        "SERIES", "CT", "SYN000001")


def test_a_c_find_failure_status_is_a_source_error(
        pacs: Callable[..., SourceSettings]) -> None:
    def on_find(event: Any) -> Iterator[Any]:
        yield 0xC001, None

    source = pacs([(evt.EVT_C_FIND, on_find)])
    with pytest.raises(SourceError, match=r"pacs: C-FIND failed: status 0xC001 \(unable to"):
        DimseSource().find_series(source, since=None)


def test_a_pacs_that_does_not_answer_in_time_is_a_source_error(
        pacs: Callable[..., SourceSettings]) -> None:
    def on_find(event: Any) -> Iterator[Any]:
        time.sleep(2.5)
        yield 0x0000, None

    source = pacs([(evt.EVT_C_FIND, on_find)], timeout_seconds=1)
    started = time.monotonic()
    with pytest.raises(SourceError, match="C-FIND: no response within 1 s"):
        DimseSource().find_series(source, since=None)
    assert time.monotonic() - started < 2.5


def test_c_get_sub_operation_failures_are_a_source_error_after_the_good_instances(
        pacs: Callable[..., SourceSettings]) -> None:
    good = list(small_series(3, seed=61).datasets)
    odd = copy.deepcopy(good[0])
    odd.SOPClassUID = "1.2.826.0.1.3680043.2.1143.999"     # no storage context for it
    odd.SOPInstanceUID = "1.2.826.0.1.3680043.2.1143.1"

    def on_get(event: Any) -> Iterator[Any]:
        yield len(good) + 1
        for ds in [*good, odd]:
            yield 0xFF00, ds

    source = pacs([(evt.EVT_C_GET, on_get)])
    fetched: list[bytes] = []
    with pytest.raises(SourceError, match=r"C-GET failed: status 0xB000 \(sub-operations "
                                          r"failed\); 3 sent, 1 failed"):
        for data in DimseSource().fetch_series(source, "1.2.3", "1.2.3.1"):
            fetched.append(data)  # type: ignore[arg-type]  # C-GET yields bytes only
    assert len(fetched) == 3 and all(d[128:132] == b"DICM" for d in fetched)


def test_a_move_destination_the_pacs_does_not_know_is_a_source_error(
        pacs: Callable[..., SourceSettings]) -> None:
    def on_move(event: Any) -> Iterator[Any]:
        yield None, None                                   # unknown destination

    source = pacs([(evt.EVT_C_MOVE, on_move)], retrieve="move", move_destination="NODE1")
    with pytest.raises(SourceError, match=r"C-MOVE failed: status 0xA801 \(move destination "
                                          r"unknown\)"):
        list(DimseSource().fetch_series(source, "1.2.3", "1.2.3.1"))


def test_a_closed_port_is_a_source_error_naming_the_peer() -> None:
    source = SourceSettings(name="pacs", kind="dimse", ae_title="QRSCP", host="127.0.0.1",
                            port=free_port(), timeout_seconds=2)
    with pytest.raises(SourceError, match=r"pacs \(127.0.0.1:\d+, AE QRSCP\) did not answer"):
        DimseSource().find_series(source, since=None)


@pytest.mark.parametrize(("keys", "message"), [
    ({"host": "pacs"}, "the keys ae_title, port for kind"),
    ({"ae_title": "P", "host": "h", "port": 104, "url": "http://x"}, "no url for kind"),
    ({"ae_title": "P", "host": "h", "port": 104, "filters": {"Modalty": "CT"}},
     "DICOM keywords such as Modality .* got 'Modalty'"),
])
def test_dimse_source_settings_name_what_is_wrong(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SourceSettings(name="pacs", kind="dimse", **keys)


def test_a_consumer_that_stops_early_aborts_the_c_get(
        pacs: Callable[..., SourceSettings]) -> None:
    datasets = list(small_series(40, seed=62).datasets)
    sent: list[int] = []

    def on_get(event: Any) -> Iterator[Any]:
        yield len(datasets)
        for ds in datasets:
            sent.append(1)
            yield 0xFF00, ds

    source = pacs([(evt.EVT_C_GET, on_get)])
    fetch = DimseSource().fetch_series(source, "1.2.3", "1.2.3.1")
    first = next(fetch)
    assert isinstance(first, bytes)
    started = time.monotonic()
    fetch.close()                        # e.g. the spool filled up: intake raised
    assert time.monotonic() - started < 3
    assert len(sent) < len(datasets)     # the PACS stopped sending: association aborted


def test_instances_moved_at_our_request_carry_the_source_name(tmp_path: Path) -> None:
    from sqlalchemy import text

    from adapters.dimse import DimseReceiver
    from node.settings import NodeSettings
    from tests.unit.helpers import Rig

    rig = Rig(tmp_path)
    receiver = DimseReceiver(NodeSettings(ae_title="PACSNODE", host="127.0.0.1",
                                          port=free_port()), rig.intake,
                             moved_from={"PACS": "archive"}.get)
    receiver.start()
    try:
        moved, pushed = small_series(1, seed=63), small_series(1, seed=64)
        ae = AE(ae_title="PACS")
        ae.add_requested_context(moved.datasets[0].SOPClassUID)
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACSNODE")
        assert assoc.is_established
        # a C-MOVE sub-operation for us (PS3.7 9.1.1.1), then an ordinary push
        assert assoc.send_c_store(moved.datasets[0], originator_aet="PACSNODE",
                                  originator_id=7).Status == 0
        assert assoc.send_c_store(pushed.datasets[0]).Status == 0
        assoc.release()
    finally:
        receiver.stop()
    with rig.engine.connect() as conn:
        tagged = dict(conn.execute(text(
            "select series_instance_uid, calling_ae_title from series")).all())
    assert tagged == {moved.series_instance_uid: "archive", pushed.series_instance_uid: "PACS"}
