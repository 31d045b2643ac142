"""Delivery to real Orthanc: per-destination transfer syntax, one association per batch,
and per-destination outbox state (one destination refusing neither delays nor duplicates
the other; ``jobs retry`` re-sends only what was not delivered)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
import torch

from node import synth
from tests.integration.dbview import IndexView
from tests.integration.test_cli_and_jobs import cli
from tests.support import Orthanc, have, storescu, wait_for

pytestmark = pytest.mark.integration

IMPLICIT = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Checks the called AE title, so a destination with the wrong one is refused."""
    if not have("Orthanc"):
        pytest.fail("Orthanc is not installed")
    orthanc = Orthanc(tmp_path_factory.mktemp("pacs"), aet="PACS", verbose=True,
                      options={"DicomCheckCalledAet": True}).start()
    yield orthanc
    orthanc.stop()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    orthanc = Orthanc(tmp_path_factory.mktemp("archive"), aet="ARCHIVE", verbose=True).start()
    yield orthanc
    orthanc.stop()


def _series(tmp_path: Path, seed: int, slices: int = 5) -> tuple[synth.SyntheticStudy,
                                                                 list[Path]]:
    study = synth.make_study(synth.SeriesSpec(slices=slices, rows=32, columns=32), seed=seed)
    return study, synth.write_study(study, tmp_path / f"ct{seed}")


def _instances(orthanc: Orthanc, study_uid: str) -> list[str]:
    found = orthanc.request("POST", "/tools/find", {"Level": "Instance", "Query": {
        "StudyInstanceUID": study_uid}})
    return [str(i) for i in found]


def _dimse(name: str, orthanc: Orthanc, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "dimse", "ae_title": orthanc.aet, "host": "127.0.0.1",
            "port": orthanc.dicom_port, "timeout_seconds": 5.0, **extra}


def test_each_destination_gets_its_transfer_syntax_in_one_association(
        dcmtk: None, node_factory: Any, pacs: Orthanc, archive: Orthanc,
        tmp_path: Path) -> None:
    destinations = [
        _dimse("pacs", pacs, transfer_syntax=IMPLICIT),
        {"name": "web", "kind": "dicomweb", "url": f"{archive.url}/dicom-web",
         "transfer_syntax": DEFLATED},
    ]
    node = node_factory(destinations=destinations,
                        routes=[{"name": "copy", "destinations": ["pacs", "web"]}]).start()
    before = pacs.associations("PACSNODE"), pacs.store_requests("PACSNODE")
    study, files = _series(tmp_path, 501)
    assert storescu(node.port, files).returncode == 0
    index = IndexView(node.config.parent / "index.db")
    wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"], timeout=30)
    for orthanc, wanted in ((pacs, IMPLICIT), (archive, DEFLATED)):
        ids = _instances(orthanc, study.study_instance_uid)
        assert len(ids) == len(files)
        stored = {orthanc.request("GET", f"/instances/{i}/metadata?expand")["TransferSyntax"]
                  for i in ids}
        assert stored == {wanted}, orthanc.aet
    # batching: the five objects went over one association, not one each
    assert pacs.associations("PACSNODE") - before[0] == 1
    assert pacs.store_requests("PACSNODE") - before[1] == len(files)


def test_a_refusing_destination_dead_letters_alone_and_retry_sends_only_it(
        dcmtk: None, node_factory: Any, pacs: Orthanc, archive: Orthanc,
        tmp_path: Path) -> None:
    destinations = [_dimse("archive", archive), _dimse("pacs", pacs, ae_title="WRONGAE")]
    node = node_factory(destinations=destinations,
                        routes=[{"name": "copy", "destinations": ["archive", "pacs"]}],
                        jobs={"retry_base_seconds": 0.3, "retry_max_seconds": 1.0,
                              "max_attempts": 3}).start()
    archive_before = archive.store_requests("PACSNODE")
    pacs_before = pacs.store_requests("PACSNODE")
    study, files = _series(tmp_path, 502)
    assert storescu(node.port, files).returncode == 0
    index = IndexView(node.config.parent / "index.db")
    # the good destination is served at the first try, while the bad one still waits
    job = wait_for(lambda: [j for j in index.jobs() if "sent:archive" in (j["step"] or "")],
                   timeout=30)[0]
    assert len(_instances(archive, study.study_instance_uid)) == len(files)
    dead = wait_for(lambda: [j for j in index.jobs() if j["state"] == "dead"], timeout=30)[0]
    assert dead["id"] == job["id"] and "rejected the association" in dead["last_error"]
    shown = json.loads(cli(node.config, "jobs", "show", str(job["id"]), "--json").stdout)
    by_name = {d["destination"]: d for d in shown["deliveries"]}
    assert by_name["archive"]["state"] == "sent" and by_name["archive"]["attempts"] == 1
    assert by_name["pacs"]["state"] == "dead" and by_name["pacs"]["attempts"] == 3
    assert "WRONGAE" in by_name["pacs"]["last_error"]
    assert "dead" in cli(node.config, "jobs", "show", str(job["id"])).stdout
    assert pacs.store_requests("PACSNODE") == pacs_before        # refused before any C-STORE

    node.config.write_text(node.config.read_text().replace('"WRONGAE"', '"PACS"'))
    assert node.proc is not None
    os.kill(node.proc.pid, signal.SIGHUP)                         # config reload
    wait_for(lambda: "reloaded" in node.log(), timeout=10)
    assert cli(node.config, "jobs", "retry", str(job["id"])).returncode == 0
    wait_for(lambda: [j for j in index.jobs() if j["id"] == job["id"]
                      and j["state"] == "done"], timeout=30)
    assert len(_instances(pacs, study.study_instance_uid)) == len(files)
    assert pacs.store_requests("PACSNODE") - pacs_before == len(files)
    assert archive.store_requests("PACSNODE") - archive_before == len(files)   # no 2nd copy
    shown = json.loads(cli(node.config, "jobs", "show", str(job["id"]), "--json").stdout)
    assert {d["destination"]: d["state"] for d in shown["deliveries"]} == {
        "archive": "sent", "pacs": "sent"}


class _BrightnessClassifier(torch.nn.Module):
    """Two classes from the mean windowed intensity (a known, deterministic answer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.mean(dim=(1, 2, 3, 4)) - 0.3) * 20.0
        return torch.stack([-z, z], dim=1)


def test_a_classifier_result_reaches_orthanc_as_an_sr_without_seg(
        dcmtk: None, node_factory: Any, archive: Orthanc, tmp_path: Path) -> None:
    model = tmp_path / "classifier.ts"
    torch.jit.script(_BrightnessClassifier()).save(str(model))  # type: ignore[no-untyped-call]
    classes = [{"name": "normal", "finding": {"value": "17621005", "scheme": "SCT",
                                              "meaning": "Normal"}},
               {"name": "abnormal", "finding": {"value": "263654008", "scheme": "SCT",
                                                "meaning": "Abnormal"}}]
    node = node_factory(
        models=[{"name": "bright", "path": str(model), "format": "torchscript",
                 "device": "cpu", "version": "0.1", "window": [-200.0, 300.0],
                 "input_size": [8, 16, 16], "classes": classes}],
        destinations=[{"name": "web", "kind": "dicomweb", "url": f"{archive.url}/dicom-web"}],
        routes=[{"name": "classify", "match": {"Modality": "CT"}, "models": ["bright"],
                 "destinations": ["web"]}]).start()
    study, files = _series(tmp_path, 503, slices=8)
    assert storescu(node.port, files).returncode == 0
    index = IndexView(node.config.parent / "index.db")
    job = wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"], timeout=120)[0]
    assert job["step"] == "encoded;sent:web"
    ids = _instances(archive, study.study_instance_uid)
    modalities = [archive.request("GET", f"/instances/{i}/simplified-tags")["Modality"]
                  for i in ids]
    assert modalities == ["SR"]                                  # no SEG for a classifier
    sr = hd.sr.srread(BytesIO(_file(archive, ids[0])))
    groups = sr.content.get_image_measurement_groups()
    found = {g.finding_type.value: g.get_measurements(
        name=hd.sr.CodedConcept("122157", "DCM", "Probability"))[0].value for g in groups}
    assert set(found) == {"17621005", "263654008"}
    assert sum(found.values()) == pytest.approx(1.0, abs=1e-5)


def _file(orthanc: Orthanc, instance: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"{orthanc.url}/instances/{instance}/file", timeout=30) as r:
        return bytes(r.read())
