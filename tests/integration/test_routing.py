"""Routing end to end: storescu → node → jobs; route explain; reload without a restart."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node import synth
from tests.integration.dbview import IndexView
from tests.support import ROOT, TCP_ENV, storescu, wait_for

pytestmark = pytest.mark.integration

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

MODELS = [{"name": "lesion-ct", "path": "models/lesion_ct"},
          {"name": "brain-mr", "path": "models/brain_mr"}]
ROUTES = [
    {"name": "ct-lesions", "match": {"Modality": "CT", "SliceThickness": {"le": 3},
                                     "ImageType": {"contains": "AXIAL"}},
     "models": ["lesion-ct"]},
    {"name": "mr-any", "match": {"Modality": "MR"}, "models": ["brain-mr"], "priority": 90},
]


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args, "-c", str(config)],
                          capture_output=True, text=True, cwd=ROOT, env=TCP_ENV, timeout=120,
                          check=False)


def _study(tmp_path: Path, name: str, spec: synth.SeriesSpec, seed: int) -> tuple[str, list[Path]]:
    study = synth.make_study(spec, seed=seed)
    return study.study_instance_uid, synth.write_study(study, tmp_path / name)


def test_ct_and_mr_get_one_job_each_and_an_unwanted_study_none(
        dcmtk: None, node_factory: Any, tmp_path: Path) -> None:
    from_modality = {"name": "from-storescu", "action": "ignore",
                     "match": {"CallingAETitle": "STORESCU", "CalledAETitle": "PACSNODE",
                               "SourceAddress": {"network": "127.0.0.0/8"}}}
    node = node_factory(models=MODELS, routes=[*ROUTES, from_modality]).start()
    index = IndexView(node.config.parent / "index.db")
    ct_uid, ct = _study(tmp_path, "ct", synth.SeriesSpec(slices=20, rows=64, columns=64,
                                                         slice_thickness_mm=1.0), 41)
    mr_uid, mr = _study(tmp_path, "mr", synth.SeriesSpec(modality="MR", slices=12, rows=64,
                                                         columns=64), 42)
    for files in (ct, mr):
        assert storescu(node.port, files).returncode == 0
    other = tmp_path / "rtdose.dcm"
    shutil.copy(TEST_FILES / "rtdose.dcm", other)
    assert storescu(node.port, [other]).returncode == 0
    jobs = wait_for(lambda: len(index.jobs()) >= 2 and index.jobs(), timeout=20)
    # the RT dose (one instance, not provably complete) completes after the quiet period
    wait_for(lambda: (s := index.series(str(pydicom.dcmread(other).SeriesInstanceUID)))
             and s["state"] == "complete", timeout=20)
    time.sleep(0.5)
    jobs = cli(node.config, "jobs", "list", "--json")
    listed = json.loads(jobs.stdout)
    got = sorted((j["route"], j["kind"], j["payload"]["model"], j["study_instance_uid"],
                  j["priority"]) for j in listed)
    assert got == sorted([("ct-lesions", "infer", "lesion-ct", ct_uid, 50),
                          ("mr-any", "infer", "brain-mr", mr_uid, 90)])
    rt_series = str(pydicom.dcmread(other).SeriesInstanceUID)
    assert f"series {rt_series}: no job (ignored by from-storescu)" in node.log()
    # how the study arrived is routable too (and shown by explain for a stored study)
    explained = json.loads(cli(node.config, "route", "explain", ct_uid, "--json").stdout)
    (ae_rule,) = [d for d in explained["studies"][0]["decisions"]
                  if d["route"] == "from-storescu"]
    assert ae_rule["fires"] and "CallingAETitle = 'STORESCU'" in ae_rule["reason"]
    assert "SourceAddress = '127.0.0.1'" in ae_rule["reason"]


def test_route_explain_on_synthetic_and_real_files(tmp_path: Path) -> None:
    from tests.support import write_config
    config = write_config(tmp_path / "cfg", models=MODELS, routes=[
        *ROUTES,
        {"name": "any-ct", "match": {"Modality": "CT"}, "models": ["lesion-ct"]},
        {"name": "ct-with-mr", "level": "study",
         "match": {"Modality": "CT", "has_series": {"Modality": "MR"}},
         "models": ["brain-mr"]},
        {"name": "archive-rest", "fallback": True, "action": "ignore"},
    ])
    folder = tmp_path / "in"
    both = synth.make_study(
        synth.SeriesSpec(slices=6, rows=32, columns=32, slice_thickness_mm=1.0),
        synth.SeriesSpec(modality="MR", slices=4, rows=32, columns=32, series_number=2),
        seed=51)
    synth.write_study(both, folder / "ct_mr")
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtdose.dcm"):
        shutil.copy(TEST_FILES / name, folder / name)
    (folder / "notes.txt").write_text("not DICOM")
    out = cli(config, "route", "explain", str(folder), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert len(report["skipped_files"]) == 1
    rows = []      # (what: modality or "study", route, fires, reason)
    for study in report["studies"]:
        modality = {x["series_instance_uid"]: x["modality"] for x in study["series"]}
        for d in study["decisions"]:
            what = modality[d["series_instance_uid"]] if d["level"] == "series" else "study"
            rows.append((what, d["route"], d["fires"], d["reason"]))

    def fired(route: str) -> list[str]:
        return sorted(what for what, r, fires, _ in rows if r == route and fires)

    def reasons(what: str, route: str) -> list[str]:
        return [why for w, r, _, why in rows if w == what and r == route]

    assert fired("any-ct") == ["CT", "CT"]             # the synthetic CT and CT_small
    assert fired("ct-lesions") == ["CT"]               # only the 1 mm synthetic one
    assert "SliceThickness = 5.0, expected <= 3" in reasons("CT", "ct-lesions")
    assert fired("mr-any") == ["MR", "MR"]             # the synthetic MR and MR_small
    assert fired("ct-with-mr") == ["study"]            # only the synthetic CT+MR study
    assert reasons("RTDOSE", "mr-any") == ["Modality = 'RTDOSE', expected 'MR'"]
    assert fired("archive-rest") == ["NM", "RTDOSE"]        # nothing else wanted them
    human = cli(config, "route", "explain", str(folder))
    assert "FIRES   mr-any: Modality = 'MR'" in human.stdout
    assert "would run:" in human.stdout
    assert cli(config, "route", "explain", "1.2.3.4.5").returncode == 4


def test_explain_by_study_uid_and_reload_without_dropping_associations(
        dcmtk: None, node_factory: Any, tmp_path: Path) -> None:
    node = node_factory(models=MODELS, routes=ROUTES[:1]).start()
    index = IndexView(node.config.parent / "index.db")
    mr_uid, mr = _study(tmp_path, "mr1", synth.SeriesSpec(modality="MR", slices=8, rows=32,
                                                          columns=32), 61)
    assert storescu(node.port, mr).returncode == 0
    explained = json.loads(cli(node.config, "route", "explain", mr_uid, "--json").stdout)
    (decision,) = explained["studies"][0]["decisions"]
    assert decision["route"] == "ct-lesions" and not decision["matched"]
    assert index.jobs() == []

    original = node.config.read_text()
    # a bad file: `config reload` refuses it and does not disturb the node
    node.config.write_text(original + '\n[[routes]]\nname = "bad"\nmatch = { Modalty = "MR" }\n')
    refused = cli(node.config, "config", "reload")
    assert refused.returncode == 3 and "did you mean 'Modality'" in refused.stderr
    # ... and the node itself refuses it when signalled directly
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in node.log(), timeout=10)
    # a good file: `config reload` validates it and the node swaps its routes
    node.config.write_text(original + '\n[[routes]]\nname = "mr-now"\n'
                           'match = { Modality = "MR" }\nmodels = ["brain-mr"]\n')
    reloaded = cli(node.config, "config", "reload", "--json")
    assert reloaded.returncode == 0, reloaded.stderr
    assert json.loads(reloaded.stdout)["routes"] == ["ct-lesions", "mr-now"]
    wait_for(lambda: "reloaded" in node.log(), timeout=10)
    # a reload in the middle of a transfer drops nothing
    big_uid, big = _study(tmp_path, "mr2", synth.SeriesSpec(modality="MR", slices=120,
                                                            rows=256, columns=256), 62)
    before = index.counts()[2]
    # (each file sent four times over the one association: it lasts well past the
    # reload, which the node's main loop takes up within 0.2 s)
    sender = subprocess.Popen(["storescu", "--repeat", "4", "-aec", "PACSNODE", "127.0.0.1",
                               str(node.port), *map(str, big)], env=TCP_ENV,
                              stderr=subprocess.PIPE)
    wait_for(lambda: index.counts()[2] >= before + 10, timeout=30, interval=0.01)
    node.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: node.log().count("reloaded") == 2, timeout=10, interval=0.01)
    assert sender.poll() is None, "the transfer ended before the reload"
    assert sender.wait(60) == 0                       # the association was not dropped
    assert index.counts()[2] == before + len(big)
    jobs = wait_for(lambda: index.jobs(), timeout=20)
    assert [(j["kind"], j["series_instance_uid"]) for j in jobs] == [
        ("infer", str(pydicom.dcmread(big[0]).SeriesInstanceUID))]
