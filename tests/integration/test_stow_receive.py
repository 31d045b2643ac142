"""STOW-RS receive on the node's HTTP server, with dicomweb-client as the client."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from node import synth
from node.multipart import build
from tests.integration.dbview import IndexView
from tests.support import free_port, wait_for

pytestmark = pytest.mark.integration

MULTIPART = 'multipart/related; type="application/dicom"; boundary=b0undary'


def _encode(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _node(node_factory: Any, tmp_path: Path, **extra: Any) -> tuple[Any, str, str]:
    http_port = free_port()
    stow_token = tmp_path / "stow-token"
    stow_token.write_text("stow-secret\n")
    node = node_factory(
        http={"host": "127.0.0.1", "port": http_port, "stow_token_file": str(stow_token)},
        destinations=[{"name": "down", "kind": "dimse", "ae_title": "X", "host": "127.0.0.1",
                       "port": free_port(), "timeout_seconds": 2.0}],
        routes=[{"name": "copy", "match": {"Modality": "CT"}, "destinations": ["down"]}],
        jobs={"max_attempts": 1}, **extra).start()
    return node, f"http://127.0.0.1:{http_port}/dicom-web", "stow-secret"


def test_stow_rs_study_is_stored_durably_and_routed_like_c_store(
        node_factory: Any, tmp_path: Path) -> None:
    node, url, token = _node(node_factory, tmp_path)
    study = synth.make_study(synth.SeriesSpec(slices=8, rows=32, columns=32), seed=611)
    datasets = list(synth.iter_datasets(study))

    with pytest.raises(requests.HTTPError) as refused:
        DICOMwebClient(url=url).store_instances(datasets)
    assert refused.value.response.status_code == 401

    client = DICOMwebClient(url=url, headers={"Authorization": f"Bearer {token}"})
    response = client.store_instances(datasets, study_instance_uid=study.study_instance_uid)
    stored = {str(i.ReferencedSOPInstanceUID) for i in response.ReferencedSOPSequence}
    assert stored == {str(d.SOPInstanceUID) for d in datasets}
    assert "FailedSOPSequence" not in response
    index = IndexView(node.config.parent / "index.db")
    assert index.sop_uids() == stored                    # indexed before the answer
    for rel in index.paths().values():                   # and on disk, readable
        assert pydicom.dcmread(node.config.parent / "spool" / rel).StudyInstanceUID == \
            study.study_instance_uid
    series_uid = study.series[0].series_instance_uid
    # the end of the request released the series: fast path, then the route's job
    done = wait_for(lambda: (s := index.series(series_uid)) and s["state"] == "complete" and s,
                    timeout=10)
    assert done["completion_reason"] == "fast_path"
    jobs = wait_for(lambda: [j for j in index.jobs() if j["series_instance_uid"] == series_uid])
    assert [j["kind"] for j in jobs] == ["forward"]

    # the admin token is accepted too; a resend is a harmless duplicate
    admin = (node.config.parent / "spool" / ".admin-token").read_text().strip()
    again = DICOMwebClient(url=url, headers={"Authorization": f"Bearer {admin}"})
    assert len(again.store_instances(datasets[:2]).ReferencedSOPSequence) == 2
    assert len(index.sop_uids()) == len(datasets)


def test_malformed_body_and_media_type_get_400_and_415_with_reasons(
        node_factory: Any, tmp_path: Path) -> None:
    node, url, token = _node(node_factory, tmp_path)
    headers = {"Authorization": f"Bearer {token}"}
    study = synth.make_study(synth.SeriesSpec(slices=1, rows=16, columns=16), seed=612)
    good = _encode(next(synth.iter_datasets(study)))
    truncated = build([good], "b0undary", "application/dicom").removesuffix(b"--b0undary--\r\n")
    answer = requests.post(f"{url}/studies", data=truncated,
                           headers={**headers, "Content-Type": MULTIPART}, timeout=30)
    assert answer.status_code == 400
    assert "closing boundary" in answer.json()["error"]
    answer = requests.post(f"{url}/studies", data=b"x", headers={
        **headers, "Content-Type": "multipart/related; type=\"application/dicom\""}, timeout=30)
    assert answer.status_code == 400 and "boundary" in answer.json()["error"]
    answer = requests.post(f"{url}/studies", data=good,
                           headers={**headers, "Content-Type": "application/dicom"}, timeout=30)
    assert answer.status_code == 415 and "multipart/related" in answer.json()["error"]
    answer = requests.post(f"{url}/studies", data=build([b"{}"], "b0undary", "x"), headers={
        **headers, "Content-Type": MULTIPART.replace("application/dicom",
                                                     "application/dicom+json")}, timeout=30)
    assert answer.status_code == 415
    assert IndexView(node.config.parent / "index.db").counts() == (0, 0, 0)


def test_partly_bad_upload_gets_202_listing_each_failed_instance(
        node_factory: Any, tmp_path: Path) -> None:
    node, url, token = _node(node_factory, tmp_path)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": MULTIPART}
    study = synth.make_study(synth.SeriesSpec(slices=3, rows=16, columns=16), seed=613)
    other = synth.make_study(synth.SeriesSpec(slices=1, rows=16, columns=16), seed=614)
    good = [_encode(d) for d in synth.iter_datasets(study)]
    foreign = next(synth.iter_datasets(other))        # another study than the URL names
    body = build([*good, b"not DICOM at all", _encode(foreign)], "b0undary",
                 "application/dicom")
    answer = requests.post(f"{url}/studies/{study.study_instance_uid}", data=body,
                           headers=headers, timeout=30)
    assert answer.status_code == 202
    assert answer.headers["Content-Type"] == "application/dicom+json"
    result = pydicom.Dataset.from_json(answer.json())
    assert len(result.ReferencedSOPSequence) == 3
    failed = {(str(i.get("ReferencedSOPInstanceUID", "")), int(i.FailureReason))
              for i in result.FailedSOPSequence}
    assert failed == {("", 0xC000), (str(foreign.SOPInstanceUID), 0xA900)}
    warnings = answer.headers["Warning"]
    assert "part 4" in warnings and "part 5" in warnings and "differs" in warnings
    index = IndexView(node.config.parent / "index.db")
    assert index.counts() == (1, 1, 3)                # nothing of the refused parts kept
    spool = node.config.parent / "spool"
    assert len([p for p in spool.rglob("*.dcm")]) == 3

    everything_bad = build([b"junk", b"more junk"], "b0undary", "application/dicom")
    answer = requests.post(f"{url}/studies", data=everything_bad, headers=headers, timeout=30)
    assert answer.status_code == 409
    assert len(json.loads(answer.text)["00081198"]["Value"]) == 2
