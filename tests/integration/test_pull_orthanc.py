"""Pull mode against a real Orthanc with its DICOMweb plugin: QIDO-RS finds, WADO-RS
fetches, the reference model reads the study and its SEG + SR go back by STOW-RS, and
nothing is fetched twice, even after a restart."""

from __future__ import annotations

import io
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from node import synth
from tests.integration.dbview import IndexView
from tests.support import wait_for

pytestmark = pytest.mark.integration

INTERVAL = 1.0
REFERENCE = Path(__file__).resolve().parents[2] / "models" / "lesion_ct"


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


def assert_restart_fetches_nothing(node: Any, source: str, interval: float) -> None:
    """Restart the node: its polls of ``source`` find everything already fetched."""
    assert node.stop() == 0
    mark = len(node.log())
    node.start()
    time.sleep(3 * interval)
    assert f"scheduled poll:{source}" in node.log()[mark:]
    assert _fetch_lines(node, mark) == []


def test_pulled_study_is_routed_once_and_not_fetched_again_after_restart(
        dcmtk: None, node_factory: Any, orthanc_factory: Any, tmp_path: Path) -> None:
    orthanc = orthanc_factory().start()
    node = node_factory(
        sources=[{"name": "archive", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web",
                  "interval_seconds": INTERVAL, "lookback_hours": 48,
                  "filters": {"Modality": "CT"}}],
        models=[{"name": "lesion-ct", "path": str(REFERENCE), "device": "cpu"}],
        destinations=[{"name": "web", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web"}],
        routes=[{"name": "ct-lesions", "models": ["lesion-ct"], "destinations": ["web"],
                 "match": {"Modality": "CT", "CallingAETitle": "archive", "SeriesNumber": 1}}],
    ).start()
    index = IndexView(node.config.parent / "index.db")
    today = datetime.now(UTC).strftime("%Y%m%d")
    # the phantom inside the geometry the reference model was validated on, and a scout
    study = synth.make_study(synth.SeriesSpec(slices=64, rows=192, columns=192,
                                              pixel_spacing_mm=1.0, slice_thickness_mm=1.5,
                                              seed=621),
                             synth.SeriesSpec(slices=4, rows=32, columns=32, series_number=2),
                             seed=621)
    first, second = study.series
    old = synth.make_study(synth.SeriesSpec(slices=2, rows=16, columns=16), seed=622)
    mr = synth.make_study(synth.SeriesSpec(modality="MR", slices=2, rows=16, columns=16),
                          seed=623)
    _upload(orthanc, list(old.series[0].datasets), "20200101")    # outside the window
    _upload(orthanc, list(mr.series[0].datasets), today)          # filtered out
    _upload(orthanc, list(first.datasets), today)
    uploaded = time.monotonic()

    wanted = {str(d.SOPInstanceUID) for d in first.datasets}
    wait_for(lambda: wanted <= index.sop_uids(), timeout=30)
    arrived = time.monotonic() - uploaded
    print(f"pulled {len(wanted)} instances {arrived:.2f} s after the upload ended")
    # one polling interval, plus the transfer on a loaded 2-core machine
    assert arrived < INTERVAL + 6.0, arrived
    # processed like a C-STORE arrival: fast path, the model, results back by STOW-RS
    done = wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"], timeout=180)
    assert [j["series_instance_uid"] for j in done] == [first.series_instance_uid]
    assert done[0]["step"] == "encoded;sent:web"
    assert index.series(first.series_instance_uid)["completion_reason"] == "fast_path"
    results = DICOMwebClient(url=f"{orthanc.url}/dicom-web").search_for_series(
        search_filters={"StudyInstanceUID": study.study_instance_uid})
    assert sorted(pydicom.Dataset.from_json(r).Modality for r in results) == ["CT", "SEG", "SR"]

    # (a poll during the upload may have fetched part of the series, then the rest)
    assert all(first.series_instance_uid in line for line in _fetch_lines(node))

    # the study gains a series: only that one is fetched
    mark = len(node.log())
    _upload(orthanc, list(second.datasets), today)
    wanted |= {str(d.SOPInstanceUID) for d in second.datasets}
    wait_for(lambda: wanted <= index.sop_uids(), timeout=30)
    time.sleep(2 * INTERVAL)                            # more polls: nothing new
    assert index.sop_uids() == wanted    # not the old or MR study, nor our own SEG/SR
    lines = _fetch_lines(node, mark)
    assert len(lines) == 1 and second.series_instance_uid in lines[0]

    # restart: the table remembers, nothing is fetched again
    assert_restart_fetches_nothing(node, "archive", INTERVAL)
    assert index.counts() == (1, 2, 68)
    rows = index._query("select series_instance_uid, instances from pulled_series "
                        "where source = 'archive' order by instances")
    assert rows == [(second.series_instance_uid, 4), (first.series_instance_uid, 64)]
