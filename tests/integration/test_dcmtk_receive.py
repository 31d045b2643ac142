"""dcmtk as the modality: echo, a 300-slice CT, completion, association policy,
transfer syntaxes stored exactly as received."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian as EXPLICIT_LE

from node import synth
from tests.integration.dbview import IndexView
from tests.support import TCP_ENV, proc_status_kib, storescu, wait_for

pytestmark = pytest.mark.integration


def _index(node: Any) -> IndexView:
    return IndexView(node.config.parent / "index.db")


def _echo(port: int, *, aet: str = "ECHOSCU", aec: str = "PACSNODE") -> int:
    return subprocess.run(["echoscu", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
                          capture_output=True, env=TCP_ENV, timeout=30).returncode


def _dataset_bytes(path: Path) -> bytes:
    """The data set part of a Part 10 file (everything after the file meta group)."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta_len = int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[132 + 12 + meta_len:]


@pytest.fixture(scope="module")
def ct300(tmp_path_factory: pytest.TempPathFactory) -> tuple[synth.SyntheticStudy, list[Path]]:
    out = tmp_path_factory.mktemp("ct300")
    study = synth.make_study(synth.SeriesSpec(slices=300, rows=512, columns=512,
                                              slice_thickness_mm=1.0), seed=3)
    return study, synth.write_study(study, out)


def test_echo(dcmtk: None, node_factory: Any) -> None:
    node = node_factory().start()
    assert _echo(node.port) == 0


def test_300_slice_ct_arrives_whole_and_completes_by_fast_path(
        dcmtk: None, node_factory: Any, ct300: tuple[synth.SyntheticStudy, list[Path]]) -> None:
    study, files = ct300
    node = node_factory(assembly={"series_quiet_seconds": 30.0, "study_quiet_seconds": 60.0})
    node.start()
    result = storescu(node.port, files)
    released = datetime.now(UTC).replace(tzinfo=None)
    assert result.returncode == 0, result.stderr
    index = _index(node)
    assert index.counts() == (1, 1, 300)
    series_uid = study.series[0].series_instance_uid
    row = wait_for(lambda: (s := index.series(series_uid)) and s["state"] == "complete" and s,
                   timeout=5)
    assert row["completion_reason"] == "fast_path"
    assert (row["completed_at"] - released).total_seconds() < 1.0
    sent = {str(ds.SOPInstanceUID) for ds in study.series[0].datasets}
    assert index.sop_uids() == sent
    spool = node.config.parent / "spool"
    for sop, rel in list(index.paths().items())[::50]:
        original = files[[str(d.SOPInstanceUID) for d in study.series[0].datasets].index(sop)]
        assert _dataset_bytes(spool / rel) == _dataset_bytes(original)


def test_series_with_a_missing_slice_waits_for_the_quiet_period(
        dcmtk: None, node_factory: Any, tmp_path: Path) -> None:
    spec = synth.SeriesSpec(slices=20, rows=64, columns=64, omit_instance_numbers=(7,))
    study = synth.make_study(spec, seed=5)
    files = synth.write_study(study, tmp_path / "gap")
    node = node_factory(assembly={"series_quiet_seconds": 3.0, "study_quiet_seconds": 4.0})
    node.start()
    assert storescu(node.port, files).returncode == 0
    released = time.monotonic()
    index = _index(node)
    uid = study.series[0].series_instance_uid
    time.sleep(1.5)
    assert index.series(uid)["state"] == "receiving"
    row = wait_for(lambda: (s := index.series(uid)) and s["state"] == "complete" and s,
                   timeout=10)
    assert row["completion_reason"] == "quiet"
    assert time.monotonic() - released >= 2.5
    assert "not provably complete at release" in node.log()


def test_unknown_calling_ae_and_wrong_called_ae_are_rejected_with_a_reason(
        dcmtk: None, node_factory: Any) -> None:
    node = node_factory(node={"allowed_callers": [
        {"ae_title": "GOODSCU", "host": "127.0.0.1"},
        {"ae_title": "FARSCU", "host": "10.9.0.0/16"},
    ]}).start()
    assert _echo(node.port, aet="GOODSCU") == 0
    assert _echo(node.port, aet="BADSCU") != 0
    assert _echo(node.port, aet="FARSCU") != 0
    assert _echo(node.port, aet="GOODSCU", aec="NOTUS") != 0
    log = node.log()
    assert "rejected: calling AE title 'BADSCU' is not in allowed_callers" in log
    assert "calling AE title 'FARSCU' is allowed, but not from address 127.0.0.1" in log
    assert "called AE title 'NOTUS' is not ours ('PACSNODE')" in log
    assert log.count("GOODSCU (127.0.0.1) rejected") == 1     # only the NOTUS attempt


PROPOSE = {
    "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.4.50": "-xy",
}


def _dcmtk_convert(tool: str, option: str, src: Path, dst: Path) -> Path:
    subprocess.run([tool, option, str(src), str(dst)], check=True, capture_output=True)
    return dst


def test_compressed_transfer_syntaxes_are_stored_exactly_as_received(
        dcmtk: None, node_factory: Any, tmp_path: Path) -> None:
    base = synth.make_study(synth.SeriesSpec(slices=4, rows=64, columns=64), seed=9)
    plain = synth.write_study(base, tmp_path / "plain")
    files: dict[str, Path] = {}
    for name, uid in (("rle", "1.2.840.10008.1.2.5"), ("j2k", "1.2.840.10008.1.2.4.90"),
                      ("jls", "1.2.840.10008.1.2.4.80")):
        study = synth.make_study(synth.SeriesSpec(slices=2, rows=64, columns=64,
                                                  series_description=name), seed=10)
        files[uid] = synth.write_study(study, tmp_path / name, transfer_syntax=uid)[0]
    files["1.2.840.10008.1.2.4.70"] = _dcmtk_convert("dcmcjpeg", "+e1", plain[0],
                                                     tmp_path / "jpeg_lossless.dcm")
    files["1.2.840.10008.1.2.1.99"] = _dcmtk_convert("dcmconv", "+td", plain[1],
                                                     tmp_path / "deflated.dcm")
    baseline = Path(pydicom.data.get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    files["1.2.840.10008.1.2.4.50"] = baseline
    node = node_factory().start()
    for uid, path in files.items():
        assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) \
            == uid
        # propose the file's own transfer syntax, so storescu sends it unconverted
        result = storescu(node.port, [path], extra=[PROPOSE[uid], "-R"])
        assert result.returncode == 0, (uid, result.stderr)
    index = _index(node)
    spool = node.config.parent / "spool"
    paths = index.paths()
    for uid, path in files.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = spool / paths[str(ds.SOPInstanceUID)]
        assert str(pydicom.dcmread(stored, stop_before_pixels=True).file_meta
                   .TransferSyntaxUID) == uid
        if uid == "1.2.840.10008.1.2.1.99":
            # storescu re-deflates on the wire (its own compression level and padding):
            # what was received is stored, and it inflates to the original data set.
            assert zlib.decompress(_dataset_bytes(stored), -15) == \
                zlib.decompress(_dataset_bytes(path), -15)
        else:
            assert _dataset_bytes(stored) == _dataset_bytes(path), uid


def test_association_limit_rejects_with_a_reason(dcmtk: None, node_factory: Any) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    node = node_factory(node={"max_associations": 1, "acse_timeout_seconds": 60.0}).start()
    for _ in range(3):      # port probes must not hold the only slot
        socket.create_connection(("127.0.0.1", node.port)).close()
    time.sleep(0.3)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        assert _echo(node.port, aet="SECOND") != 0
    finally:
        assoc.release()
    assert wait_for(lambda: _echo(node.port, aet="THIRD") == 0, timeout=5)
    assert "SECOND (127.0.0.1) rejected: 1 associations already active" in node.log()


def _without_images_in_acquisition(files: list[Path]) -> list[Path]:
    for path in files:             # as many CT and MR series are sent: no count to go by
        ds = pydicom.dcmread(path)
        del ds.ImagesInAcquisition
        ds.save_as(path)
    return files


def test_one_association_per_instance_completes_once_after_the_quiet_period(
        dcmtk: None, node_factory: Any, tmp_path: Path) -> None:
    """Some senders open an association for every instance. After the second, the
    series' two slices are contiguous and evenly spaced like a whole series; the fast
    path must not take that for complete (it did: 7 generations for 8 instances, each
    routed again)."""
    study = synth.make_study(synth.SeriesSpec(slices=8, rows=16, columns=16), seed=51)
    files = _without_images_in_acquisition(synth.write_study(study, tmp_path / "ct"))
    node = node_factory(assembly={"series_quiet_seconds": 2.0, "study_quiet_seconds": 3.0})
    node.start()
    for path in files:
        assert storescu(node.port, [path]).returncode == 0
    index = _index(node)
    uid = study.series[0].series_instance_uid
    assert index.series(uid)["state"] == "receiving"
    row = wait_for(lambda: (s := index.series(uid)) and s["state"] == "complete" and s,
                   timeout=10)
    assert (row["completion_reason"], row["generation"]) == ("quiet", 1)
    assert "carried 1 of its" in node.log()
    assert "follow-up generation" not in node.log()


@pytest.mark.parametrize("count", [True, False], ids=["ImagesInAcquisition", "no-count"])
def test_a_series_split_over_parallel_associations(
        dcmtk: None, node_factory: Any, tmp_path: Path, count: bool) -> None:
    """Four associations at once, each a contiguous quarter of one series (itself
    contiguous and evenly spaced): with ImagesInAcquisition the last release completes
    it (the count proves it); without, no association carried it whole and it waits for
    its quiet period, once."""
    study = synth.make_study(synth.SeriesSpec(slices=40, rows=32, columns=32), seed=52)
    files = synth.write_study(study, tmp_path / "ct")
    if not count:
        _without_images_in_acquisition(files)
    node = node_factory(assembly={"series_quiet_seconds": 2.0, "study_quiet_seconds": 3.0})
    node.start()
    senders = [subprocess.Popen(
        ["storescu", "-aec", "PACSNODE", "127.0.0.1", str(node.port),
         *map(str, files[10 * i:10 * i + 10])],
        env=TCP_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(4)]
    assert [p.wait(60) for p in senders] == [0, 0, 0, 0]
    index = _index(node)
    uid = study.series[0].series_instance_uid
    row = wait_for(lambda: (s := index.series(uid)) and s["state"] == "complete" and s,
                   timeout=10)
    assert (row["completion_reason"], row["generation"]) == \
        ("fast_path" if count else "quiet", 1)
    assert index.counts() == (1, 1, 40)


def _big_instance(path: Path, transfer_syntax: str, size: int, seed: int) -> Path:
    """One CT slice of ``size`` bytes of pixel data: native (Explicit VR LE) or as one
    encapsulated fragment that only claims ``transfer_syntax`` (stored, never decoded)."""
    study = synth.make_study(synth.SeriesSpec(slices=1, rows=16, columns=16), seed=seed)
    ds = next(synth.iter_datasets(study))
    side = int((size // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    pixels = os.urandom(side * side * 2)
    if transfer_syntax == EXPLICIT_LE:
        ds.PixelData = pixels
    else:
        ds.PixelData = encapsulate([pixels])
        ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path, enforce_file_format=True)
    return path


# 96 MiB: beyond the header window for JPEG 2000 (header read from the file); 2 MiB:
# within it (read from the first PDUs, kept)
@pytest.mark.parametrize(("transfer_syntax", "size"), [
    (EXPLICIT_LE, 96 << 20), ("1.2.840.10008.1.2.4.90", 96 << 20),
    ("1.2.840.10008.1.2.4.90", 2 << 20)])
def test_a_very_large_instance_is_received_in_bounded_memory(
        dcmtk: None, node_factory: Any, tmp_path: Path, transfer_syntax: str,
        size: int) -> None:
    path = _big_instance(tmp_path / "big.dcm", transfer_syntax, size, seed=31)
    node = node_factory(node={"listener_processes": 1}).start()
    assert node.proc is not None
    before = proc_status_kib(node.proc.pid, "VmHWM")
    extra = [] if transfer_syntax == EXPLICIT_LE else [PROPOSE[transfer_syntax], "-R"]
    result = storescu(node.port, [path], extra=extra)
    assert result.returncode == 0, result.stderr
    grown_mib = (proc_status_kib(node.proc.pid, "VmHWM") - before) / 1024
    print(f"peak RSS +{grown_mib:.0f} MiB for a {path.stat().st_size / 2**20:.0f} MiB instance")
    # what is in flight (a PDU, an O_DIRECT buffer, the header window), not the instance
    assert grown_mib < 32
    [stored] = _index(node).paths().values()
    assert _dataset_bytes(node.config.parent / "spool" / stored) == _dataset_bytes(path)
