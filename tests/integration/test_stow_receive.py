"""STOW-RS receive on the node's HTTP server, with dicomweb-client as the client."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from node import synth
from node.multipart import build
from tests.integration.dbview import IndexView
from tests.support import free_port, proc_status_kib, wait_for

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


def _part(data: bytes) -> bytes:
    return b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"


def test_stow_rs_parts_are_stored_while_the_body_still_arrives(
        node_factory: Any, tmp_path: Path) -> None:
    node, url, token = _node(node_factory, tmp_path)
    study = synth.make_study(synth.SeriesSpec(slices=3, rows=64, columns=64), seed=615)
    datasets = list(synth.iter_datasets(study))
    index = IndexView(node.config.parent / "index.db")
    seen_mid_body: list[set[str]] = []

    def body() -> Iterator[bytes]:        # chunked transfer coding, as requests sends it
        yield _part(_encode(datasets[0])) + b"--b0undary"   # part 1 and its delimiter
        # the sender waits: part 1 must be stored (indexed) before the body has ended
        seen_mid_body.append(wait_for(index.sop_uids, timeout=10))
        yield b"\r\nContent-Type: application/dicom\r\n\r\n" + _encode(datasets[1]) + b"\r\n"
        yield _part(_encode(datasets[2])) + b"--b0undary--\r\n"

    answer = requests.post(f"{url}/studies", data=body(), timeout=60, headers={
        "Authorization": f"Bearer {token}", "Content-Type": MULTIPART})
    assert seen_mid_body == [{str(datasets[0].SOPInstanceUID)}]
    assert answer.status_code == 200
    result = pydicom.Dataset.from_json(answer.json())
    assert [str(i.ReferencedSOPInstanceUID) for i in result.ReferencedSOPSequence] == \
        [str(d.SOPInstanceUID) for d in datasets]
    assert index.sop_uids() == {str(d.SOPInstanceUID) for d in datasets}


def test_a_body_that_breaks_off_keeps_the_parts_stored_before(
        node_factory: Any, tmp_path: Path) -> None:
    node, url, token = _node(node_factory, tmp_path)
    study = synth.make_study(synth.SeriesSpec(slices=3, rows=64, columns=64), seed=616)
    encoded = [_encode(d) for d in synth.iter_datasets(study)]
    body = build(encoded, "b0undary", "application/dicom")
    cut = body.index(encoded[2]) + len(encoded[2]) // 2     # inside part 3
    # the sender goes away (closes its side) inside part 3
    head, payload = _post_raw(url, token, f"Content-Length: {len(body)}", body[:cut])
    assert head.split()[1] == b"202"
    result = pydicom.Dataset.from_json(json.loads(payload))
    assert len(result.ReferencedSOPSequence) == 2
    [failed] = result.FailedSOPSequence
    assert int(failed.FailureReason) == 0xC000
    assert b"part 3" in head and b"closed after" in head     # the Warning says where and why
    index = IndexView(node.config.parent / "index.db")
    assert index.counts() == (1, 1, 2)
    spool = node.config.parent / "spool"
    assert len(list(spool.rglob("*.dcm"))) == 2
    assert not list(spool.rglob("*.part"))                 # the half-received one is gone


def test_a_large_upload_is_stored_in_little_memory(node_factory: Any, tmp_path: Path) -> None:
    node, url, token = _node(node_factory, tmp_path)
    study = synth.make_study(synth.SeriesSpec(slices=64, rows=512, columns=512), seed=617)
    body = build([_encode(d) for d in synth.iter_datasets(study)], "b0undary",
                 "application/dicom")
    assert len(body) > 32 << 20
    before = proc_status_kib(node.proc.pid, "VmHWM") * 1024
    answer = requests.post(f"{url}/studies", data=body, timeout=120, headers={
        "Authorization": f"Bearer {token}", "Content-Type": MULTIPART})
    assert answer.status_code == 200
    assert len(IndexView(node.config.parent / "index.db").sop_uids()) == 64
    grown = proc_status_kib(node.proc.pid, "VmHWM") * 1024 - before
    print(f"peak RSS grew by {grown / 2**20:.1f} MiB for a {len(body) / 2**20:.1f} MiB body")
    assert grown < len(body) / 4


def test_chunked_body_with_broken_framing_keeps_the_parts_stored_before(
        node_factory: Any, tmp_path: Path) -> None:
    node, url, token = _node(node_factory, tmp_path)
    study = synth.make_study(synth.SeriesSpec(slices=2, rows=64, columns=64), seed=618)
    first, second = (_part(_encode(d)) for d in synth.iter_datasets(study))
    first += b"--b0undary"            # the delimiter that ends part 1 is in the first chunk
    head, payload = _post_raw(url, token, "Transfer-Encoding: chunked",
                              b"%x\r\n" % len(first) + first + b"\r\n"
                              + b"zz-not-a-size\r\n" + second[10:] + b"\r\n0\r\n\r\n")
    assert head.split()[1] == b"202"
    result = pydicom.Dataset.from_json(json.loads(payload))
    assert len(result.ReferencedSOPSequence) == 1
    assert b"bad chunk size line" in head
    assert len(IndexView(node.config.parent / "index.db").sop_uids()) == 1


def _post_raw(url: str, token: str, framing: str, body: bytes) -> tuple[bytes, bytes]:
    """POST ``body`` as is on a socket, close our side, read the whole answer: (status
    line and headers, payload)."""
    port = int(url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {token}\r\nContent-Type: {MULTIPART}\r\n"
                     f"{framing}\r\n\r\n".encode() + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    return head, payload
