"""Results to a real PACS: Orthanc by C-STORE and by STOW-RS (its DICOMweb plugin)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from node import synth
from tests.integration.dbview import IndexView
from tests.support import storescu, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "models" / "lesion_ct"


def _node(node_factory: Any, orthanc: Any, destination: dict[str, Any]) -> Any:
    return node_factory(
        models=[{"name": "lesion-ct", "path": str(REFERENCE), "device": "cpu"}],
        destinations=[destination],
        routes=[{"name": "ct-lesions", "match": {"Modality": "CT"}, "models": ["lesion-ct"],
                 "destinations": [destination["name"]]}],
        jobs={"retry_base_seconds": 0.5, "retry_max_seconds": 2.0, "max_attempts": 50},
    ).start()


def _phantom(tmp_path: Path, seed: int) -> tuple[synth.SyntheticStudy, list[Path]]:
    # inside the geometry the reference model was validated on (its metadata.json)
    spec = synth.SeriesSpec(slices=64, rows=192, columns=192, pixel_spacing_mm=1.0,
                            slice_thickness_mm=1.5, seed=seed)
    study = synth.make_study(spec, seed=seed)
    return study, synth.write_study(study, tmp_path / f"ct{seed}")


def _validate(path: Path) -> None:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]
    assert errors == [], errors


def _check_objects(seg_path: Path, sr_path: Path, study: synth.SyntheticStudy,
                   files: list[Path]) -> None:
    _validate(seg_path)
    _validate(sr_path)
    out = subprocess.run(["dcentvfy", *map(str, files), str(seg_path), str(sr_path)],
                         capture_output=True, text=True, check=False)
    assert [x for x in (out.stdout + out.stderr).splitlines() if "Error" in x] == []
    seg = hd.seg.segread(seg_path)
    sr = hd.sr.srread(sr_path)
    series = study.series[0]
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == study.study_instance_uid
    # SR → SEG and source series references resolve
    refs = {item.ReferencedSOPInstanceUID
            for ev in sr.CurrentRequestedProcedureEvidenceSequence
            for s in ev.ReferencedSeriesSequence for item in s.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in refs
    assert {str(d.SOPInstanceUID) for d in series.datasets} <= refs
    volume = None
    for item in sr.ContentSequence:
        for sub in getattr(item, "ContentSequence", []):
            for m in getattr(sub, "ContentSequence", []):
                name = m.ConceptNameCodeSequence[0]
                if name.CodeValue == "118565006" and "MeasuredValueSequence" in m:
                    volume = float(m.MeasuredValueSequence[0].NumericValue)
    assert volume is not None
    truth = series.lesion_volume_mm3
    assert abs(volume - truth) / truth < 0.10, (volume, truth)
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "lesion-ct"


def test_seg_and_sr_reach_orthanc_by_c_store_exactly_once(
        dcmtk: None, node_factory: Any, orthanc_factory: Any, tmp_path: Path) -> None:
    orthanc = orthanc_factory(verbose=True).start()
    destination = {"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                   "host": "127.0.0.1", "port": orthanc.dicom_port}
    node = _node(node_factory, orthanc, destination)
    study, files = _phantom(tmp_path, 9101)
    orthanc.stop()                                   # the PACS is down when results are ready
    assert storescu(node.port, files).returncode == 0
    index = IndexView(node.config.parent / "index.db")
    wait_for(lambda: [j for j in index.jobs() if (j["step"] or "").startswith("encoded")
                      and j["attempts"] >= 2], timeout=300)
    orthanc.start()                                  # back: the outbox delivers
    job = wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"], timeout=120)[0]
    assert job["step"] == "encoded;sent:pacs"
    found = orthanc.request("POST", "/tools/find", {"Level": "Instance", "Query": {
        "StudyInstanceUID": study.study_instance_uid}, "Expand": True})
    modalities = sorted(orthanc.request("GET", f"/instances/{i['ID']}/simplified-tags")
                        ["Modality"] for i in found)
    assert modalities == ["SEG", "SR"]               # exactly one copy of each
    assert orthanc.associations("PACSNODE") == 1     # SEG and SR in one association
    assert orthanc.store_requests("PACSNODE") == 2
    results = node.config.parent / "results" / f"job-{job['id']}"
    _check_objects(results / "seg.dcm", results / "sr.dcm", study, files)


def test_seg_and_sr_reach_orthanc_by_stow_rs(
        dcmtk: None, node_factory: Any, orthanc_factory: Any, tmp_path: Path) -> None:
    orthanc = orthanc_factory().start()
    destination = {"name": "web", "kind": "dicomweb",
                   "url": f"{orthanc.url}/dicom-web"}
    node = _node(node_factory, orthanc, destination)
    study, files = _phantom(tmp_path, 9102)
    assert storescu(node.port, files).returncode == 0
    index = IndexView(node.config.parent / "index.db")
    job = wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"], timeout=300)[0]
    assert job["step"] == "encoded;sent:web"
    client = DICOMwebClient(url=f"{orthanc.url}/dicom-web")
    series = client.search_for_series(search_filters={
        "StudyInstanceUID": study.study_instance_uid})
    found = sorted(pydicom.Dataset.from_json(s).Modality for s in series)
    assert found == ["SEG", "SR"]
    results = node.config.parent / "results" / f"job-{job['id']}"
    _check_objects(results / "seg.dcm", results / "sr.dcm", study, files)
    saved = np.load(results / f"{study.series[0].series_instance_uid}.npz")
    truth = study.series[0].lesion_mask
    dice = 2 * (saved["labels"].astype(bool) & truth).sum() / (
        saved["labels"].astype(bool).sum() + truth.sum())
    assert dice >= 0.9
