"""Faults at intake: kill -9 mid-transfer, and a full disk."""

from __future__ import annotations

import random
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node import synth
from tests.integration.dbview import IndexView
from tests.support import TCP_ENV, half_written, storescu, tmpfs_mount, wait_for

pytestmark = pytest.mark.integration


def _acknowledged(storescu_output: str) -> list[str]:
    """Files storescu saw answered with Success, from its -v log."""
    acked: list[str] = []
    current: str | None = None
    for line in storescu_output.splitlines():
        if m := re.search(r"Sending file: (.+)$", line):
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def _refused(storescu_output: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    current: str | None = None
    for line in storescu_output.splitlines():
        if m := re.search(r"Sending file: (.+)$", line):
            current = m.group(1).strip()
        elif m := re.search(r"Received Store Response \((.+)\)", line):
            if "Success" not in m.group(1) and current:
                out.append((current, m.group(1)))
            current = None
    return out


def _assert_whole(path: Path) -> None:
    ds = pydicom.dcmread(path)
    assert len(ds.PixelData) == ds.Rows * ds.Columns * ds.BitsAllocated // 8


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    study = synth.make_study(synth.SeriesSpec(slices=160, rows=256, columns=256), seed=21)
    return synth.write_study(study, tmp_path_factory.mktemp("ct160"))


def test_kill_9_during_transfer_loses_no_acknowledged_instance(
        dcmtk: None, node_factory: Any, ct_files: list[Path]) -> None:
    node = node_factory().start()
    index = IndexView(node.config.parent / "index.db")
    spool = node.config.parent / "spool"
    rng = random.Random(7)
    all_acked: set[str] = set()
    for _round in range(3):
        sender = subprocess.Popen(
            ["storescu", "-v", "-aec", "PACSNODE", "127.0.0.1", str(node.port),
             *map(str, ct_files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=TCP_ENV)
        # kill once a random number of new instances has been indexed
        target = min(index.counts()[2] + rng.randint(5, 40), len(ct_files) - 1)
        wait_for(lambda t=target: index.counts()[2] >= t, timeout=60, interval=0.01)
        node.kill9()
        output, _ = sender.communicate(timeout=60)
        assert sender.returncode != 0          # the sender saw the node go away
        acked = _acknowledged(output)
        assert acked, output[-2000:]
        all_acked |= {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                      for p in acked}
        node.start()                           # restart: recovery runs before the listener
        present = index.sop_uids()
        assert all_acked <= present, f"lost: {sorted(all_acked - present)[:3]}"
        paths = index.paths()
        for uid in all_acked:
            _assert_whole(spool / paths[uid])
        assert half_written(spool / ".tmp") == []
        for file in spool.rglob("*.dcm"):      # nothing half-written is visible
            _assert_whole(file)
    # the sender retries everything: duplicates are harmless, nothing is missing
    assert storescu(node.port, ct_files).returncode == 0
    assert index.counts() == (1, 1, len(ct_files))


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Any:
    with tmpfs_mount(tmp_path / "spool", "3m") as mount:
        yield mount


def test_disk_full_answers_out_of_resources_and_recovers(
        dcmtk: None, node_factory: Any, ct_files: list[Path], small_tmpfs: Path) -> None:
    files = ct_files[:40]                      # ~5 MB into a 3 MB spool
    node = node_factory(storage={"spool": str(small_tmpfs), "min_free_mb": 0}).start()
    index = IndexView(node.config.parent / "index.db")
    result = subprocess.run(
        ["storescu", "-v", "-nh", "-aec", "PACSNODE", "127.0.0.1", str(node.port),
         *map(str, files)], capture_output=True, text=True, env=TCP_ENV, timeout=120)
    output = result.stdout + result.stderr
    acked = _acknowledged(output)
    refused = _refused(output)
    assert acked and refused, output[-3000:]
    assert len(acked) + len(refused) == len(files)
    assert all("OutOfResources" in why for _, why in refused), refused[:3]
    assert "A700 out of resources" in node.log()
    present = index.sop_uids()
    for path in acked:
        assert str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) in present
    for path, _ in refused:
        assert str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) not in present
    assert half_written(small_tmpfs / ".tmp") == []   # failed writes left nothing behind
    # space returns
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    retry = storescu(node.port, [p for p, _ in refused])
    assert retry.returncode == 0, retry.stderr
    assert index.counts()[2] == len(files)
    time.sleep(0.1)
    assert node.proc is not None and node.proc.poll() is None


class _PacedSender(threading.Thread):
    """Sends files over one association with a pause after each, recording which ones
    were answered Success. The pause makes "mid-transfer" certain on any machine: a fast
    sender can finish a whole series in the time a signal takes to act."""

    def __init__(self, port: int, files: list[Path], pause: float) -> None:
        super().__init__(daemon=True)
        self.port, self.files, self.pause = port, files, pause
        self.acked: set[str] = set()
        self.ended_by: str = ""

    def run(self) -> None:
        ae = AE(ae_title="PACED")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="PACSNODE")
        if not assoc.is_established:
            self.ended_by = "no association"
            return
        for path in self.files:
            ds = pydicom.dcmread(path)
            try:
                status = assoc.send_c_store(ds)
            except (RuntimeError, OSError) as exc:
                self.ended_by = f"error: {exc}"
                break
            if not assoc.is_established or not status or status.Status != 0:
                self.ended_by = "association ended"
                break
            self.acked.add(str(ds.SOPInstanceUID))
            time.sleep(self.pause)
        else:
            self.ended_by = "all sent"
        if assoc.is_established:
            assoc.release()


def test_sigterm_during_transfer_loses_nothing_and_exits_cleanly(
        dcmtk: None, node_factory: Any, ct_files: list[Path]) -> None:
    node = node_factory().start()
    index = IndexView(node.config.parent / "index.db")
    sender = _PacedSender(node.port, ct_files, pause=0.03)
    sender.start()
    wait_for(lambda: index.counts()[2] >= 30, timeout=60, interval=0.01)
    assert node.stop() == 0                    # SIGTERM: a clean exit, not a crash
    sender.join(60)
    assert sender.ended_by != "all sent"       # it really was mid-transfer
    assert 30 <= len(sender.acked) < len(ct_files)
    assert "stopped" in node.log()
    node.start()
    assert sender.acked <= index.sop_uids()   # every acknowledged instance survived
    assert storescu(node.port, ct_files).returncode == 0   # the sender's retry completes it
    assert index.counts() == (1, 1, len(ct_files))
