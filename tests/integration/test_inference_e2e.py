"""storescu → node → route → worker process → prediction on the source grid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from node import synth
from tests.integration.dbview import IndexView
from tests.support import ROOT, TCP_ENV, storescu, wait_for
from tests.unit.test_runner import make_bundle

pytestmark = pytest.mark.integration


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args, "-c", str(config)],
                          capture_output=True, text=True, cwd=ROOT, env=TCP_ENV, timeout=300,
                          check=False)


def test_routed_ct_is_inferred_by_the_worker_process(
        dcmtk: None, node_factory: Any, tmp_path: Path) -> None:
    from tests.integration.test_cli_and_jobs import StoreSCP
    scp = StoreSCP(tmp_path / "pacs").start()
    bundle = make_bundle(tmp_path / "bundle")
    node = node_factory(
        models=[{"name": "tiny", "path": str(bundle), "device": "cpu"}],
        destinations=[{"name": "pacs", "kind": "dimse", "ae_title": "PACS",
                       "host": "127.0.0.1", "port": scp.port}],
        routes=[{"name": "ct", "match": {"Modality": "CT"}, "models": ["tiny"],
                 "destinations": ["pacs"]}]).start()
    study = synth.make_study(synth.SeriesSpec(slices=16, rows=32, columns=32), seed=71)
    files = synth.write_study(study, tmp_path / "ct")
    assert storescu(node.port, files).returncode == 0
    index = IndexView(node.config.parent / "index.db")
    done = wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"], timeout=120)
    (job,) = done
    assert job["kind"] == "infer" and job["step"] == "encoded;sent:pacs"
    results = node.config.parent / "results" / f"job-{job['id']}"
    saved = np.load(results / f"{study.series[0].series_instance_uid}.npz")
    assert saved["labels"].shape == (16, 32, 32)
    provenance = json.loads(str(saved["provenance"]))
    assert provenance["model"] == "tiny" and provenance["version"] == "1.0.0"
    assert list(saved["sop_instance_uids"]) == [str(d.SOPInstanceUID)
                                                for d in study.series[0].datasets]
    received = [pydicom.dcmread(p) for p in sorted(scp.directory.iterdir())]
    modalities = sorted(str(ds.Modality) for ds in received)
    expected = ["SEG", "SR"] if saved["labels"].any() else ["SR"]
    assert modalities == expected
    assert all(ds.StudyInstanceUID == study.study_instance_uid for ds in received)
    scp.stop()
    # patient identifiers: in the audit log, never in the ordinary log
    patient = study.patient
    log_text = node.log()
    for secret in (patient.patient_id, patient.patient_name, patient.birth_date):
        assert secret not in log_text
    events = [json.loads(line) for line in
              (node.config.parent / "var" / "audit.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert {"received", "routed", "inferred", "delivered"} <= set(kinds)
    inferred = next(e for e in events if e["event"] == "inferred")
    assert set(inferred["seconds"]) == {"volume", "predict", "encode"}
    assert all(0 <= v < 120 for v in inferred["seconds"].values())
    assert inferred["started"] <= inferred["time"]
    received = next(e for e in events if e["event"] == "received")
    assert received["patient_id"] == patient.patient_id
    assert received["patient_name"] == patient.patient_name
    assert all(e["study_instance_uid"] == study.study_instance_uid for e in events)
    listed = json.loads(cli(node.config, "models", "list", "--json").stdout)
    assert listed[0]["loaded"] is True and listed[0]["weights_sha256"] == provenance[
        "weights_sha256"]
    # the worker is its own process: killing it leaves the receiver answering
    status = json.loads((node.config.parent / "spool" / ".worker-status-cpu.json").read_text())
    os.kill(status["pid"], signal.SIGKILL)
    again = synth.make_study(synth.SeriesSpec(slices=16, rows=32, columns=32), seed=72)
    assert storescu(node.port, synth.write_study(again, tmp_path / "ct2")).returncode == 0
    # the PACS is down now: the result waits, encoded, for the destination
    wait_for(lambda: [j for j in index.jobs() if j["state"] in ("pending", "delivering")
                      and (j["step"] or "").startswith("encoded")], timeout=120)
    assert "restarting" in node.log()


def test_infer_command_on_a_folder(tmp_path: Path) -> None:
    from tests.support import write_config
    bundle = make_bundle(tmp_path / "bundle")
    config = write_config(tmp_path / "cfg", models=[{"name": "tiny", "path": str(bundle)}])
    study = synth.make_study(synth.SeriesSpec(slices=10, rows=24, columns=24), seed=73)
    synth.write_study(study, tmp_path / "in")
    out = cli(config, "infer", "--model", "tiny", str(tmp_path / "in"), "--out",
              str(tmp_path / "out"), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    saved = np.load(info["output"])
    assert saved["labels"].shape == (10, 24, 24)
    assert info["series_instance_uid"] == study.series[0].series_instance_uid
    assert cli(config, "infer", "--model", "nope", str(tmp_path / "in"), "--out",
               str(tmp_path / "o2")).returncode == 4


def test_late_images_rerun_and_the_new_sr_supersedes_the_old(
        dcmtk: None, node_factory: Any, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    node = node_factory(models=[{"name": "tiny", "path": str(bundle)}],
                        routes=[{"name": "ct", "match": {"Modality": "CT"},
                                 "models": ["tiny"]}]).start()
    study = synth.make_study(synth.SeriesSpec(slices=12, rows=32, columns=32), seed=74)
    files = synth.write_study(study, tmp_path / "ct")
    assert storescu(node.port, files[:-1]).returncode == 0      # the last slice is late
    index = IndexView(node.config.parent / "index.db")
    first = wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"], timeout=120)[0]
    assert storescu(node.port, files[-1:]).returncode == 0      # follow-up, generation 2
    second = wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"
                               and j["id"] != first["id"]], timeout=120)[0]
    results = node.config.parent / "results"
    old = pydicom.dcmread(results / f"job-{first['id']}" / "sr.dcm")
    new = pydicom.dcmread(results / f"job-{second['id']}" / "sr.dcm")
    assert new.SOPInstanceUID != old.SOPInstanceUID
    predecessor = new.PredecessorDocumentsSequence[0]
    ref = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == old.SOPInstanceUID
    labels = np.load(results / f"job-{second['id']}" /
                     f"{study.series[0].series_instance_uid}.npz")["labels"]
    assert labels.shape[0] == 12                                 # the whole series this time


def test_stow_rs_with_basic_auth_refusal_then_retry(
        dcmtk: None, node_factory: Any, orthanc_factory: Any, tmp_path: Path) -> None:
    orthanc = orthanc_factory(users={"node": "s3cret"}).start()
    password = tmp_path / "password"
    password.write_text("wrong\n")
    bundle = make_bundle(tmp_path / "bundle")
    node = node_factory(
        models=[{"name": "tiny", "path": str(bundle)}],
        destinations=[{"name": "web", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web",
                       "username": "node", "password_file": str(password)}],
        routes=[{"name": "ct", "match": {"Modality": "CT"}, "models": ["tiny"],
                 "destinations": ["web"]}]).start()
    study = synth.make_study(synth.SeriesSpec(slices=10, rows=32, columns=32), seed=75)
    assert storescu(node.port, synth.write_study(study, tmp_path / "ct")).returncode == 0
    index = IndexView(node.config.parent / "index.db")
    failed = wait_for(lambda: [j for j in index.jobs() if j["state"] == "failed"], timeout=120)[0]
    assert "HTTP 401" in failed["last_error"] and failed["attempts"] == 1   # not retried
    assert "s3cret" not in node.log() and "wrong" not in node.log()
    password.write_text("s3cret\n")
    assert cli(node.config, "jobs", "retry", str(failed["id"])).returncode == 0
    done = wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"], timeout=120)[0]
    assert done["step"] == "encoded;sent:web"
    found = orthanc.request("POST", "/tools/find", {"Level": "Instance", "Query": {
        "StudyInstanceUID": study.study_instance_uid}})
    assert len(found) >= 1
