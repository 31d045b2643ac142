"""The listener's waking association loops (adapters/reactor.py) against a pynetdicom SCU:
stores and releases are served, and every association gives its wake-up sockets back."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adapters.dimse import DimseReceiver
from adapters.reactor import WakingDUL
from node.db import InstanceRow
from node.settings import NodeSettings
from tests.support import free_port
from tests.unit.helpers import Rig, small_series


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_stores_and_releases_are_served_and_no_wakeup_socket_is_left(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    released: list[set[str]] = []
    receiver = DimseReceiver(NodeSettings(host="127.0.0.1", port=free_port()), rig.intake,
                             on_released=released.append)
    receiver.start()
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
    assert sorted(next(iter(r)) for r in released) == sorted(
        str(s.datasets[0].SeriesInstanceUID) for s in series)
    with Session(rig.engine) as session:
        assert session.scalar(select(func.count()).select_from(InstanceRow)) == 24
