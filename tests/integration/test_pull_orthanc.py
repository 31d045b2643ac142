"""Pull mode against a real Orthanc with its DICOMweb plugin: QIDO-RS finds, WADO-RS
fetches, routing processes, and nothing is fetched twice, even after a restart."""

from __future__ import annotations

import io
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node import synth
from tests.integration.dbview import IndexView
from tests.support import wait_for

pytestmark = pytest.mark.integration

INTERVAL = 1.0


def _upload(orthanc: Any, datasets: list[pydicom.Dataset], study_date: str) -> None:
    for ds in datasets:
        ds.StudyDate = ds.SeriesDate = study_date
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        req = urllib.request.Request(f"{orthanc.url}/instances", data=buf.getvalue(),
                                     method="POST",
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200


def _fetch_lines(node: Any, start: int = 0) -> list[str]:
    return [line for line in node.log()[start:].splitlines() if "fetching series" in line]


def test_pulled_study_is_routed_once_and_not_fetched_again_after_restart(
        dcmtk: None, node_factory: Any, orthanc_factory: Any, tmp_path: Path) -> None:
    orthanc = orthanc_factory().start()
    node = node_factory(
        sources=[{"name": "archive", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web",
                  "interval_seconds": INTERVAL, "lookback_hours": 48,
                  "filters": {"Modality": "CT"}}],
        destinations=[{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                       "host": "127.0.0.1", "port": orthanc.dicom_port}],
        routes=[{"name": "copy", "match": {"Modality": "CT", "CallingAETitle": "archive"},
                 "destinations": ["pacs"]}],
    ).start()
    index = IndexView(node.config.parent / "index.db")
    today = datetime.now(UTC).strftime("%Y%m%d")
    study = synth.make_study(synth.SeriesSpec(slices=6, rows=32, columns=32),
                             synth.SeriesSpec(slices=4, rows=32, columns=32, series_number=2),
                             seed=621)
    first, second = study.series
    old = synth.make_study(synth.SeriesSpec(slices=2, rows=16, columns=16), seed=622)
    mr = synth.make_study(synth.SeriesSpec(modality="MR", slices=2, rows=16, columns=16),
                          seed=623)
    _upload(orthanc, list(old.series[0].datasets), "20200101")    # outside the window
    _upload(orthanc, list(mr.series[0].datasets), today)          # filtered out
    uploaded = time.monotonic()
    _upload(orthanc, list(first.datasets), today)

    wanted = {str(d.SOPInstanceUID) for d in first.datasets}
    wait_for(lambda: wanted <= index.sop_uids(), timeout=30)
    arrived = time.monotonic() - uploaded
    assert arrived < INTERVAL + 3.0, arrived           # within one polling interval
    # processed like a C-STORE arrival: fast path, the route's job, delivered
    done = wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"], timeout=30)
    assert [j["series_instance_uid"] for j in done] == [first.series_instance_uid]
    assert index.series(first.series_instance_uid)["completion_reason"] == "fast_path"

    # the study gains a series: only that one is fetched
    _upload(orthanc, list(second.datasets), today)
    wanted |= {str(d.SOPInstanceUID) for d in second.datasets}
    wait_for(lambda: wanted <= index.sop_uids(), timeout=30)
    time.sleep(3 * INTERVAL)                            # more polls: nothing new
    assert index.sop_uids() == wanted                   # neither the old nor the MR study
    lines = _fetch_lines(node)
    assert len(lines) == 2
    assert first.series_instance_uid in lines[0] and second.series_instance_uid in lines[1]

    # restart: the table remembers, nothing is fetched again
    assert node.stop() == 0
    mark = len(node.log())
    node.start()
    time.sleep(4 * INTERVAL)
    assert "scheduled poll:archive" in node.log()[mark:]
    assert _fetch_lines(node, mark) == []
    assert index.counts() == (1, 2, 10)
    rows = index._query("select series_instance_uid, instances from pulled_series "
                        "where source = 'archive' order by instances")
    assert rows == [(second.series_instance_uid, 4), (first.series_instance_uid, 6)]
