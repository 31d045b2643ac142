"""Faults across the whole pipeline: a stream of studies through receiver, worker and a real
Orthanc while processes are killed, and many parallel associations at once."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node import synth
from tests.integration.dbview import IndexView
from tests.integration.test_faults import _acknowledged
from tests.support import TCP_ENV, proc_status_kib, storescu, wait_for
from tests.unit.test_runner import make_bundle

pytestmark = pytest.mark.integration


def _uids(paths: list[Path] | list[str]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def _results_in_orthanc(orthanc: Any, study_uid: str) -> dict[str, list[str]]:
    found = orthanc.request("POST", "/tools/find", {
        "Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True})
    by_modality: dict[str, list[str]] = {}
    for item in found:
        tags = orthanc.request("GET", f"/instances/{item['ID']}/simplified-tags")
        by_modality.setdefault(tags["Modality"], []).append(tags["SOPInstanceUID"])
    return by_modality


def _worker_pid(node: Any) -> int:
    path = node.config.parent / "spool" / ".worker-status-cpu.json"
    return int(json.loads(path.read_text())["pid"])


def test_kill_9_of_receiver_and_worker_in_a_stream_delivers_each_study_once(
        dcmtk: None, node_factory: Any, orthanc_factory: Any, tmp_path: Path) -> None:
    orthanc = orthanc_factory().start()
    node = node_factory(
        models=[{"name": "tiny", "path": str(make_bundle(tmp_path / "bundle")),
                 "device": "cpu"}],
        destinations=[{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                       "host": "127.0.0.1", "port": orthanc.dicom_port}],
        routes=[{"name": "ct", "match": {"Modality": "CT"}, "models": ["tiny"],
                 "destinations": ["pacs"]}],
        # long enough that a restart never completes a half-sent series early
        assembly={"series_quiet_seconds": 6.0, "study_quiet_seconds": 7.0}).start()
    index = IndexView(node.config.parent / "index.db")
    rng = random.Random(2026)
    studies = [synth.make_study(synth.SeriesSpec(slices=12, rows=32, columns=32),
                                seed=400 + i) for i in range(5)]
    files = [synth.write_study(s, tmp_path / f"study{i}") for i, s in enumerate(studies)]
    acknowledged: set[str] = set()
    killed_worker_in: list[str] = []
    for i, study_files in enumerate(files):
        if i == 1:
            # the receiver dies mid-association; the sender's retry completes the series
            before = index.counts()[2]
            sender = subprocess.Popen(
                ["storescu", "-v", "-aec", "PACSNODE", "127.0.0.1", str(node.port),
                 *map(str, study_files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, env=TCP_ENV)
            target = before + rng.randint(2, 9)
            wait_for(lambda t=target: index.counts()[2] >= t, timeout=60, interval=0.005)
            node.kill9()
            output, _ = sender.communicate(timeout=60)
            acknowledged |= _uids(_acknowledged(output))
            node.start()
            assert acknowledged <= index.sop_uids()
        result = storescu(node.port, study_files)
        assert result.returncode == 0, result.stderr
        acknowledged |= _uids(study_files)
        if i in (2, 3):
            # the worker dies while it holds this study's job (or, if the job is
            # quicker than our poll, right after it)
            uid = studies[i].series[0].series_instance_uid
            job = wait_for(lambda u=uid: next(
                (j for j in index.jobs() if j["series_instance_uid"] == u
                 and j["state"] != "pending"), None), timeout=120, interval=0.005)
            if i == 3:
                time.sleep(rng.uniform(0.0, 0.3))
            killed_worker_in.append(str(job["state"]))
            subprocess.run(["kill", "-9", str(_worker_pid(node))], check=True)
    infer = lambda: [j for j in index.jobs() if j["kind"] == "infer"]  # noqa: E731
    wait_for(lambda: len(infer()) == len(studies)
             and all(j["state"] == "done" for j in infer()), timeout=240, interval=0.2)
    assert acknowledged <= index.sop_uids()
    print(f"worker killed while its job was: {killed_worker_in}")
    for study in studies:
        results = _results_in_orthanc(orthanc, study.study_instance_uid)
        assert len(results.get("SR", [])) == 1, (study.study_instance_uid, results)
        assert len(results.get("SEG", [])) <= 1, results
    assert "worker process" in node.log() and "restarting" in node.log()


def test_twenty_parallel_associations_store_everything_in_bounded_memory(
        dcmtk: None, node_factory: Any, tmp_path: Path) -> None:
    node = node_factory(node={"max_associations": 24}).start()
    assert node.proc is not None
    index = IndexView(node.config.parent / "index.db")
    senders = 20
    series = [synth.write_study(synth.make_study(
        synth.SeriesSpec(slices=10, rows=256, columns=256), seed=500 + i),
        tmp_path / f"s{i}") for i in range(senders)]
    baseline = proc_status_kib(node.proc.pid, "VmRSS")
    procs = [subprocess.Popen(
        ["storescu", "-aec", "PACSNODE", "127.0.0.1", str(node.port), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=TCP_ENV)
        for files in series]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * senders, outputs
    expected = set().union(*(_uids(files) for files in series))
    assert index.sop_uids() == expected
    assert index.counts()[2] == senders * 10
    peak = proc_status_kib(node.proc.pid, "VmHWM")
    grown_mib = (peak - baseline) / 1024
    print(f"receiver RSS {baseline / 1024:.0f} MiB before, peak {peak / 1024:.0f} MiB "
          f"during 20 associations (+{grown_mib:.0f} MiB)")
    # 20 × 128 KiB instances in flight: the peak must not scale with what was received
    # (26 MB in all), only with what is in flight at once.
    assert grown_mib < 120
