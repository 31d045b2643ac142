"""The worker's job path from files to results (``infer_series``) with the model replaced by
the synthetic ground truth: the saved .npz, the SEG and the SR line up with the source
voxel for voxel and pass dciodvfy, and the source files are read once."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest

import node.inference.service
import node.results.seg
from node import synth
from node.inference.runner import ModelInfo, Prediction, read_info
from node.inference.service import infer_series
from node.inference.volume import Volume, load_series, load_volume
from node.jobs import Job, JobStateValues
from node.settings import ModelSettings

ROOT = Path(__file__).resolve().parents[2]
SPEC = synth.SeriesSpec(slices=40, rows=128, columns=128, pixel_spacing_mm=2.5,
                        slice_thickness_mm=3.0)


@dataclass(frozen=True)
class _Runner:
    info: ModelInfo


class _TruthPool:
    """A model pool whose 'model' answers the series' lesion mask (what ModelPool offers
    ``infer_series``: ``predict`` and ``runner(name).info``)."""

    def __init__(self, info: ModelInfo, series: synth.SyntheticSeries) -> None:
        self.info, self.series = info, series
        self.row = {str(ds.SOPInstanceUID): int(ds.InstanceNumber) - 1
                    for ds in series.datasets}

    def runner(self, _model: str) -> _Runner:
        return _Runner(self.info)

    def truth(self, volume: Volume) -> np.ndarray:
        return self.series.lesion_mask[[self.row[u] for u in volume.sop_instance_uids]] \
            .astype(np.uint8)

    def predict(self, model: str, volume: Volume) -> Prediction:
        return Prediction(self.truth(volume), model, self.info.version,
                          self.info.weights_sha256, "cpu", 0.0, 1)


def _job(series: synth.SyntheticSeries) -> Job:
    when = datetime(2026, 1, 2, 3, 4, 5)
    return Job(1, "job-encode", "infer", "r", str(series.datasets[0].StudyInstanceUID),
               series.series_instance_uid, 1, {"model": "lesion-ct"},
               JobStateValues.RUNNING, None, 50, 1, None, None, when, when)


def _dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy is not installed (Debian package dicom3tools)")
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if "error" in line.lower()]


def test_job_results_line_up_with_the_source(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    study = synth.make_study(SPEC, seed=17)
    series = study.series[0]
    files = synth.write_study(study, tmp_path / "in")
    info = read_info(ModelSettings(name="lesion-ct", path=ROOT / "models" / "lesion_ct"))
    pool = _TruthPool(info, series)
    out = tmp_path / "out"
    passes: list[tuple[int, ...]] = []           # full passes over the label map: one
    for module in (node.inference.service, node.results.seg):
        def counting(labels: np.ndarray, _real: Any = module.label_counts) -> Any:
            passes.append(labels.shape)
            return _real(labels)
        monkeypatch.setattr(module, "label_counts", counting)
    saved = infer_series(pool, _job(series), list(reversed(files)), out)   # any file order
    assert len(passes) == 1, passes

    volume = load_volume(files)
    truth = pool.truth(volume)
    assert truth.any() and set(saved.seconds) == {"volume", "predict", "encode"}
    assert saved.voxels == {1: int(np.count_nonzero(truth))}
    with np.load(saved.path) as npz:
        np.testing.assert_array_equal(npz["labels"], truth)
        assert tuple(npz["sop_instance_uids"]) == volume.sop_instance_uids
        np.testing.assert_array_equal(npz["affine"], volume.affine)
        assert json.loads(str(npz["provenance"]))["weights_sha256"] == info.weights_sha256
    seg = hd.seg.segread(out / "seg.dcm")
    assert int(seg.NumberOfFrames) == int(np.count_nonzero(truth.any(axis=(1, 2))))
    back = seg.get_pixels_by_source_instance(list(volume.sop_instance_uids),
                                             combine_segments=True)
    np.testing.assert_array_equal(back, truth)
    for name in ("seg.dcm", "sr.dcm"):
        assert _dciodvfy_errors(out / name) == [], name


def test_load_series_gives_the_volume_and_headers_without_pixels(tmp_path: Path) -> None:
    study = synth.make_study(synth.SeriesSpec(slices=6, rows=16, columns=16),
                             synth.SeriesSpec(slices=2, rows=16, columns=16, series_number=2))
    series = study.series[0]
    files = synth.write_study(study, tmp_path)
    volume, headers = load_series(files, series_instance_uid=series.series_instance_uid)
    np.testing.assert_array_equal(volume.array, load_volume(
        files, series_instance_uid=series.series_instance_uid).array)
    assert sorted(str(ds.SOPInstanceUID) for ds in headers) == \
        sorted(volume.sop_instance_uids)                 # the other series is left out
    assert all("PixelData" not in ds and ds.Rows == 16 for ds in headers)
