"""A real PACS (Orthanc) pushes a study to the node over DICOM (C-STORE SCU → our SCP)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.synth import SeriesSpec, make_study, write_study
from tests.support import ROOT, Orthanc, wait_for

pytestmark = pytest.mark.integration


def _post_bytes(orthanc: Orthanc, path: str, data: bytes) -> Any:
    req = urllib.request.Request(orthanc.url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/dicom"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _cli(*args: str) -> Any:
    proc = subprocess.run([sys.executable, "-m", "node.cli", *args, "--json"],
                          check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_orthanc_pushes_a_study_and_the_fast_path_completes_it(
        tmp_path: Path, node_factory: Any, orthanc_factory: Any) -> None:
    study = make_study(
        SeriesSpec(modality="CT", slices=40, rows=256, columns=256, series_number=1),
        SeriesSpec(modality="MR", slices=12, rows=128, columns=128, series_number=2),
        seed=7,
    )
    files = write_study(study, tmp_path / "synth")
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    per_series = {s.series_instance_uid: len(s.datasets) for s in study.series}
    assert len(sent) == len(files) == 52

    node = node_factory(node={"ae_title": "PACSNODE"}).start()
    orthanc = orthanc_factory(
        modalities={"pacsnode": ["PACSNODE", "127.0.0.1", node.port]}).start()

    orthanc_study = None
    for f in files:
        answer = _post_bytes(orthanc, "/instances", f.read_bytes())
        assert answer["Status"] == "Success", answer
        orthanc_study = answer["ParentStudy"]
    assert orthanc.request("GET", "/statistics")["CountInstances"] == len(files)

    job = orthanc.request("POST", "/modalities/pacsnode/store",
                          {"Resources": [orthanc_study], "Synchronous": True})
    assert job["InstancesCount"] == len(files), job
    assert job["FailedInstancesCount"] == 0, job

    config = str(node.config)

    def completed() -> dict[str, Any] | None:
        detail = _cli("studies", "show", study.study_instance_uid, "-c", config)
        done = all(s["state"] == "complete" for s in detail["series"])
        return detail if done and len(detail["series"]) == len(per_series) else None

    # Success of each C-STORE means indexed, so the study is listed at once; completion
    # follows the release. completion_reason (checked below) tells the fast path from the
    # 3 s quiet period of the test config.
    detail = wait_for(completed, timeout=10, interval=0.1)

    listed = _cli("studies", "list", "-c", config)
    assert [s["study_instance_uid"] for s in listed] == [study.study_instance_uid]
    assert listed[0]["instances"] == len(files)
    assert listed[0]["series"] == len(per_series)
    assert {s["series_instance_uid"]: s["instances"] for s in detail["series"]} == per_series
    for series in detail["series"]:
        assert series["completion_reason"] == "fast_path", (series, node.log())
        assert series["calling_ae_title"] == orthanc.aet

    spool = node.config.parent / "spool"
    stored = [p for p in spool.rglob("*.dcm") if ".tmp" not in p.parts]
    received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in stored}
    assert len(stored) == len(files)
    assert received == sent
