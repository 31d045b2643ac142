"""Pull mode and on-demand priors from a DIMSE-only source (real Orthanc as the PACS):
C-FIND at series level, then C-GET on the same association or C-MOVE to the node's own
Storage SCP; a refused association is a SourceError that marks nothing pulled."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from dicomweb_client.api import DICOMwebClient

from node import synth
from tests.integration.dbview import IndexView
from tests.integration.test_priors_orthanc import upload_history
from tests.integration.test_pull_orthanc import (
    _fetch_lines,
    _upload,
    assert_restart_fetches_nothing,
)
from tests.support import TCP_ENV, free_port, storescu, wait_for, wait_port

pytestmark = pytest.mark.integration

INTERVAL = 1.0
SPEC = synth.SeriesSpec(slices=10, rows=32, columns=32)


def _dimse_source(orthanc: Any, **extra: Any) -> dict[str, Any]:
    return {"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet, "host": "127.0.0.1",
            "port": orthanc.dicom_port, "interval_seconds": INTERVAL, "timeout_seconds": 10,
            **extra}


def test_c_get_pull_is_routed_once_and_not_fetched_again_after_restart(
        node_factory: Any, orthanc_factory: Any) -> None:
    port = free_port()
    pacs = orthanc_factory(modalities={"node": ["PACSNODE", "127.0.0.1", port]}).start()
    down = orthanc_factory(aet="DOWN").start()
    node = node_factory(
        node={"port": port},
        sources=[_dimse_source(pacs, lookback_hours=48, filters={"Modality": "CT"})],
        destinations=[{"name": "down", "kind": "dicomweb", "url": f"{down.url}/dicom-web"}],
        routes=[{"name": "copy", "destinations": ["down"],
                 "match": {"Modality": "CT", "CallingAETitle": "pacs"}}],
    ).start()
    index = IndexView(node.config.parent / "index.db")
    today = datetime.now(UTC).strftime("%Y%m%d")
    study = synth.make_study(SPEC, seed=661)
    old = synth.make_study(synth.SeriesSpec(slices=2, rows=16, columns=16), seed=662)
    mr = synth.make_study(synth.SeriesSpec(modality="MR", slices=2, rows=16, columns=16),
                          seed=663)
    _upload(pacs, list(old.series[0].datasets), "20200101")       # outside the window
    _upload(pacs, list(mr.series[0].datasets), today)             # filtered out
    _upload(pacs, list(study.series[0].datasets), today)
    uploaded = time.monotonic()

    wanted = {str(d.SOPInstanceUID) for d in study.series[0].datasets}
    wait_for(lambda: wanted <= index.sop_uids(), timeout=30)
    print(f"C-GET pulled {len(wanted)} instances {time.monotonic() - uploaded:.2f} s "
          f"after the upload ended")
    # routed like any arrival: the forward job delivers the study downstream
    done = wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"], timeout=60)
    assert [j["series_instance_uid"] for j in done] == [study.series[0].series_instance_uid]
    copied = DICOMwebClient(url=f"{down.url}/dicom-web").search_for_instances(
        search_filters={"StudyInstanceUID": study.study_instance_uid})
    assert len(copied) == len(wanted)
    time.sleep(2 * INTERVAL)                                      # more polls: nothing new
    assert index.sop_uids() == wanted
    assert all(study.series[0].series_instance_uid in line for line in _fetch_lines(node))

    assert_restart_fetches_nothing(node, "pacs", INTERVAL)
    assert index._query("select series_instance_uid, instances from pulled_series") == [
        (study.series[0].series_instance_uid, len(wanted))]
    assert len(index.jobs()) == 1


def test_priors_arrive_by_c_move_to_the_nodes_own_scp(
        dcmtk: None, node_factory: Any, orthanc_factory: Any, tmp_path: Path) -> None:
    port = free_port()
    pacs = orthanc_factory(modalities={"node": ["PACSNODE", "127.0.0.1", port]}).start()
    node = node_factory(
        node={"port": port, "allowed_callers": [{"ae_title": "STORESCU"},
                                                {"ae_title": pacs.aet}]},
        sources=[_dimse_source(pacs, retrieve="move", interval_seconds=3600)],
        routes=[{"name": "priors", "level": "study", "action": "fetch_priors",
                 "source": "pacs", "priors": 1,
                 "match": {"Modality": "CT", "not": {"CallingAETitle": "pacs"}}}],
    ).start()
    patient, prior = upload_history(pacs, SPEC, 671)

    current = synth.make_study(SPEC, patient=patient, seed=675)
    files = []
    for i, ds in enumerate(synth.iter_datasets(current)):
        ds.StudyDate = "20261101"
        files.append(tmp_path / f"cur{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    storescu(port, files, aet="STORESCU")

    index = IndexView(node.config.parent / "index.db")
    job = wait_for(lambda: [j for j in index.jobs() if j["state"] == "done"], timeout=30)[0]
    assert job["kind"] == "fetch_priors"
    assert job["step"] == f"fetched:1 series,{SPEC.slices} instances"
    wanted = {str(d.SOPInstanceUID) for d in
              [*synth.iter_datasets(current), *prior.series[0].datasets]}
    assert index.sop_uids() == wanted            # the latest prior only, not the others
    assert index._query("select study_instance_uid, instances from pulled_series") == [
        (prior.study_instance_uid, SPEC.slices)]
    # moved at our request (Move Originator = our AE title) from the source's PACS: the
    # instances are tagged with the source's name, so the prior did not chase its priors
    assert index._query("select calling_ae_title from series where series_instance_uid = ?",
                        prior.series[0].series_instance_uid) == [("pacs",)]
    assert len(index.jobs()) == 1


def test_a_refused_association_is_a_source_error_and_nothing_is_pulled(
        node_factory: Any, orthanc_factory: Any) -> None:
    port = free_port()
    pacs = orthanc_factory(modalities={"node": ["PACSNODE", "127.0.0.1", port]},
                           options={"DicomCheckCalledAet": True}).start()
    today = datetime.now(UTC).strftime("%Y%m%d")
    _upload(pacs, list(synth.make_study(SPEC, seed=681).series[0].datasets), today)
    node = node_factory(node={"port": port},
                        sources=[_dimse_source(pacs, ae_title="NOT-ORTHANC")]).start()
    wait_for(lambda: "query failed" in node.log(), timeout=20)
    line = next(x for x in node.log().splitlines() if "query failed" in x)
    assert "pacs (127.0.0.1:" in line and "AE NOT-ORTHANC) rejected the association" in line
    assert "Called AE title not recognised" in line           # the PACS's own reason
    index = IndexView(node.config.parent / "index.db")
    assert index._query("select count(*) from pulled_series") in ([], [(0,)])
    assert index.sop_uids() == set()


@pytest.fixture
def strict_archive(dcmtk: None, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """dcmtk's dcmqrscp as a PACS that checks C-FIND identifiers (-XF): a SERIES query
    without the study's UID is refused, as a strictly hierarchical archive does."""
    port = free_port()
    store = tmp_path / "archive"
    store.mkdir()
    config = tmp_path / "dcmqrscp.cfg"
    config.write_text(f"NetworkTCPPort = {port}\nMaxPDUSize = 65536\nMaxAssociations = 16\n"
                      "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
                      f"AETable BEGIN\nARCHIVE {store} RW (100, 1024mb) ANY\nAETable END\n")
    proc = subprocess.Popen(["dcmqrscp", "-XF", "-c", str(config), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=TCP_ENV)
    try:
        wait_port(port, proc=proc)
        yield "ARCHIVE", port
    finally:
        proc.terminate()
        proc.wait(10)


def test_hierarchical_poll_pulls_from_a_pacs_that_refuses_series_queries(
        node_factory: Any, strict_archive: tuple[str, int], tmp_path: Path) -> None:
    aet, port = strict_archive
    today = datetime.now(UTC).strftime("%Y%m%d")
    ct = synth.make_study(SPEC, seed=664)
    mr = synth.make_study(synth.SeriesSpec(modality="MR", slices=2, rows=16, columns=16),
                          seed=665)
    for name, study in (("ct", ct), ("mr", mr)):
        for ds in synth.iter_datasets(study):
            ds.StudyDate = ds.SeriesDate = today
        files = synth.write_study(study, tmp_path / name)
        assert storescu(port, files, aec=aet).returncode == 0
    source = {"name": "pacs", "kind": "dimse", "ae_title": aet, "host": "127.0.0.1",
              "port": port, "interval_seconds": INTERVAL, "timeout_seconds": 10,
              "filters": {"Modality": "CT"}}
    relational = node_factory(sources=[source]).start()      # one SERIES-level query
    wait_for(lambda: "query failed" in relational.log(), timeout=30)
    assert "C-FIND failed" in relational.log()
    assert IndexView(relational.config.parent / "index.db").sop_uids() == set()
    relational.stop()

    node = node_factory(sources=[{**source, "query": "hierarchical"}]).start()
    index = IndexView(node.config.parent / "index.db")
    wanted = {str(d.SOPInstanceUID) for d in synth.iter_datasets(ct)}
    wait_for(lambda: wanted <= index.sop_uids(), timeout=30)
    time.sleep(2 * INTERVAL)                              # more polls: nothing new
    assert index.sop_uids() == wanted                     # the MR series filtered out
    assert "query failed" not in node.log()
    lines = _fetch_lines(node)
    assert lines and all(ct.series[0].series_instance_uid in line for line in lines)
