"""The listener's waking association loops (adapters/reactor.py) against a pynetdicom SCU:
stores and releases are served, and every association gives its wake-up sockets back."""

from __future__ import annotations

import os
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.service_class import VerificationServiceClass
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adapters import reactor
from adapters.dimse import DimseReceiver
from adapters.reactor import WakingDUL
from node.db import InstanceRow
from node.settings import NodeSettings
from tests.support import free_port
from tests.unit.helpers import Rig, small_series


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _receiver(rig: Rig, released: list[dict[str, int]]) -> DimseReceiver:
    """A started receiver on a free port that records each release's series."""
    receiver = DimseReceiver(NodeSettings(host="127.0.0.1", port=free_port()), rig.intake,
                             on_released=released.append)
    receiver.start()
    return receiver


def test_stores_and_releases_are_served_and_no_wakeup_socket_is_left(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    released: list[dict[str, int]] = []
    receiver = _receiver(rig, released)
    try:
        series = [small_series(2, seed=seed) for seed in range(12)]
        before = _open_fds()
        for s in series:
            ae = AE(ae_title="SCU")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACSNODE")
            assert assoc.is_established
            # the acceptor side of this association runs the waking DUL
            assert any(isinstance(t, WakingDUL) for t in threading.enumerate())
            for ds in s.datasets:
                status = assoc.send_c_store(ds)
                assert status and status.Status == 0
            assoc.release()
            assert assoc.is_released
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
                len(released) < len(series)
                or any(isinstance(t, WakingDUL) for t in threading.enumerate())):
            time.sleep(0.05)
        assert not any(isinstance(t, WakingDUL) for t in threading.enumerate())
        # Each association that kept its socket pair would hold two more descriptors.
        assert _open_fds() - before < 4
    finally:
        receiver.stop()
    # each release: the one series the association carried, with its two instances
    assert sorted(released, key=lambda r: sorted(r)) == sorted(
        ({str(s.datasets[0].SeriesInstanceUID): 2} for s in series), key=lambda r: sorted(r))
    with Session(rig.engine) as session:
        assert session.scalar(select(func.count()).select_from(InstanceRow)) == 24


def _spy_store_threads(rig: Rig) -> list[str]:
    """Names of the threads the (real) intake stores on, in order: whole instances
    (``store``, pynetdicom's path) or instances taken as they arrive (``receive``)."""
    threads: list[str] = []

    def spying(real: Any) -> Any:
        def spy(*args: Any, **kwargs: Any) -> Any:
            threads.append(threading.current_thread().name)
            return real(*args, **kwargs)
        return spy

    for name in ("store", "receive"):
        setattr(rig.intake, name, spying(getattr(rig.intake, name)))
    return threads


def test_a_store_is_served_on_the_dul_thread_and_echo_on_the_association_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig(tmp_path)
    threads = _spy_store_threads(rig)
    echoed: list[str] = []
    echo = VerificationServiceClass.SCP

    def spy_echo(self: VerificationServiceClass, req: Any, context: Any) -> None:
        echoed.append(threading.current_thread().name)
        echo(self, req, context)

    monkeypatch.setattr(VerificationServiceClass, "SCP", spy_echo)
    receiver = DimseReceiver(NodeSettings(host="127.0.0.1", port=free_port()), rig.intake)
    receiver.start()
    try:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACSNODE")
        assert assoc.is_established
        dul_names = {t.name for t in threading.enumerate() if isinstance(t, WakingDUL)}
        statuses = [assoc.send_c_store(ds).Status for ds in small_series(3).datasets]
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        receiver.stop()
    assert statuses == [0, 0, 0]
    assert len(threads) == 3 and set(threads) <= dul_names, (threads, dul_names)
    assert echoed and echoed[0] not in dul_names


def test_a_store_behind_a_request_in_hand_waits_its_turn(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that does not wait (C-ECHO-RQ and C-STORE-RQ back to back) while the
    association thread is still serving the echo: the store is not overtaken onto the DUL
    thread, and the responses come back in request order."""
    rig = Rig(tmp_path)
    threads = _spy_store_threads(rig)
    echo = VerificationServiceClass.SCP

    def slow_echo(self: VerificationServiceClass, req: Any, context: Any) -> None:
        time.sleep(0.5)
        echo(self, req, context)

    monkeypatch.setattr(VerificationServiceClass, "SCP", slow_echo)
    receiver = DimseReceiver(NodeSettings(host="127.0.0.1", port=free_port()), rig.intake)
    receiver.start()
    ds = small_series(1).datasets[0]
    try:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACSNODE")
        assert assoc.is_established
        contexts = {str(cx.abstract_syntax): cx.context_id for cx in assoc.accepted_contexts}
        dul_names = {t.name for t in threading.enumerate() if isinstance(t, WakingDUL)}
        # keep the SCU's own reactor off its message queue while we read it ourselves
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.001)
        echo_rq = C_ECHO()
        echo_rq.MessageID = 1
        echo_rq.AffectedSOPClassUID = Verification
        store_rq = C_STORE()
        store_rq.MessageID = 2
        store_rq.AffectedSOPClassUID = ds.SOPClassUID
        store_rq.AffectedSOPInstanceUID = ds.SOPInstanceUID
        store_rq.Priority = 2
        store_rq.DataSet = BytesIO(encode(ds, False, True))
        assoc.dimse.send_msg(echo_rq, contexts[Verification])
        assoc.dimse.send_msg(store_rq, contexts[CTImageStorage])
        answers = [assoc.dimse.get_msg(block=True)[1] for _ in range(2)]
        assoc._reactor_checkpoint.set()
        assoc.release()
    finally:
        receiver.stop()
    assert [type(a).__name__ for a in answers] == ["C_ECHO", "C_STORE"]
    assert [a.MessageIDBeingRespondedTo for a in answers] == [1, 2]
    assert answers[1].Status == 0
    assert len(threads) == 1 and threads[0] not in dul_names


def test_with_a_dimse_sent_handler_bound_the_response_goes_through_pynetdicom(
        tmp_path: Path) -> None:
    """Whoever binds EVT_DIMSE_SENT sees every response, those of C-STOREs read by the
    fast path too (they are then encoded by pynetdicom rather than by hand)."""
    rig = Rig(tmp_path)
    receiver = DimseReceiver(NodeSettings(host="127.0.0.1", port=free_port()), rig.intake)
    receiver.start()
    seen: list[tuple[str, int]] = []
    receiver._server.bind(evt.EVT_DIMSE_SENT, lambda event: seen.append(
        (type(event.message).__name__, int(event.message.command_set.Status))))
    threads = _spy_store_threads(rig)
    try:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACSNODE")
        assert assoc.is_established
        dul_names = {t.name for t in threading.enumerate() if isinstance(t, WakingDUL)}
        statuses = [assoc.send_c_store(ds).Status for ds in small_series(2).datasets]
        assoc.release()
    finally:
        receiver.stop()
    assert statuses == [0, 0]
    assert set(threads) <= dul_names                   # still read by the fast path
    assert seen == [("C_STORE_RSP", 0), ("C_STORE_RSP", 0)]


def test_a_release_is_taken_up_at_once(tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The association thread waits for DIMSE messages up to MAX_WAIT; a peer's
    A-RELEASE-RQ ends that wait, so the sender is not kept waiting for the A-RELEASE-RP.
    MAX_WAIT is made long here so that a release seen only after it would show."""
    monkeypatch.setattr(reactor, "MAX_WAIT", 0.5)
    released: list[dict[str, int]] = []
    receiver = _receiver(Rig(tmp_path), released)
    try:
        took = []
        for _ in range(4):
            ae = AE(ae_title="SCU")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACSNODE")
            assert assoc.is_established
            assert assoc.send_c_store(small_series(1).datasets[0]).Status == 0
            time.sleep(0.05)        # the association thread is back in its wait
            start = time.monotonic()
            assoc.release()
            assert assoc.is_released
            took.append(time.monotonic() - start)
    finally:
        receiver.stop()
    assert max(took) < 0.25, took
    assert len(released) == 4
