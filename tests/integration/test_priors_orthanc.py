"""On-demand fetch: a route asks a DICOMweb source (real Orthanc) for the patient's
most recent earlier study when a study arrives, and the node fetches just that one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dicomweb_client.api import DICOMwebClient

from node import synth
from tests.integration.dbview import IndexView
from tests.integration.test_pull_orthanc import _upload
from tests.support import free_port, wait_for

pytestmark = pytest.mark.integration


def upload_history(orthanc: Any, spec: synth.SeriesSpec,
                   seed: int) -> tuple[synth.PatientInfo, synth.SyntheticStudy]:
    """A patient with two earlier studies at ``orthanc`` (the latest one is returned) and
    a study of another patient, dated between them."""
    patient = synth.make_patient(seed)
    prior = synth.make_study(spec, patient=patient, seed=seed + 1)
    older = synth.make_study(spec, patient=patient, seed=seed + 2)
    stranger = synth.make_study(spec, seed=seed + 3)               # another patient
    _upload(orthanc, list(prior.series[0].datasets), "20250101")
    _upload(orthanc, list(older.series[0].datasets), "20240101")
    _upload(orthanc, list(stranger.series[0].datasets), "20250601")
    return patient, prior


def test_a_route_fetches_the_most_recent_prior_of_the_same_patient(
        node_factory: Any, orthanc_factory: Any, tmp_path: Path) -> None:
    orthanc = orthanc_factory().start()
    http_port = free_port()
    node = node_factory(
        http={"host": "127.0.0.1", "port": http_port},
        sources=[{"name": "archive", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web",
                  "interval_seconds": 3600, "filters": {"Modality": "CT"}}],
        routes=[{"name": "priors", "level": "study", "action": "fetch_priors",
                 "source": "archive", "priors": 1,
                 "match": {"Modality": "CT", "not": {"CallingAETitle": "archive"}}}],
    ).start()
    spec = synth.SeriesSpec(slices=3, rows=16, columns=16)
    patient, prior = upload_history(orthanc, spec, 631)

    current = synth.make_study(spec, patient=patient, seed=635)
    datasets = list(synth.iter_datasets(current))
    for ds in datasets:
        ds.StudyDate = "20261101"
    token = (node.config.parent / "spool" / ".admin-token").read_text().strip()
    DICOMwebClient(url=f"http://127.0.0.1:{http_port}/dicom-web",
                   headers={"Authorization": f"Bearer {token}"}).store_instances(datasets)

    index = IndexView(node.config.parent / "index.db")
    job = wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"], timeout=30)[0]
    assert job["kind"] == "fetch_priors"
    wanted = {str(d.SOPInstanceUID) for d in [*datasets, *prior.series[0].datasets]}
    assert index.sop_uids() == wanted            # the latest prior only, not the others
    rows = index._query("select study_instance_uid from pulled_series")
    assert rows == [(prior.study_instance_uid,)]
    # the prior arrived tagged with the source's name: the route did not chase its priors
    assert len(index.jobs()) == 1
