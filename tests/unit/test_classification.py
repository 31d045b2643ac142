"""Classification models: a tiny TorchScript classifier made here, its class probabilities
as TID 1500 qualitative evaluations in an SR (no SEG), checked by dciodvfy and read back
with highdicom."""

from __future__ import annotations

import math
import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from node import synth
from node.errors import ModelError, ResultError
from node.inference.runner import TorchRunner
from node.inference.service import encode_results
from node.inference.volume import Volume, volume_from_datasets
from node.jobs import Job, JobStateValues
from node.results.sr import build_sr
from node.settings import ModelSettings

WINDOW = (-200.0, 300.0)
GAIN = 20.0
CLASSES = [
    {"name": "no lesion", "finding": {"value": "260413007", "scheme": "SCT",
                                      "meaning": "None"}},
    {"name": "lesion", "finding": {"value": "52988006", "scheme": "SCT", "meaning": "Lesion"}},
]


class _MeanClassifier(torch.nn.Module):
    """Logits (-z, z) with z = GAIN * (mean windowed intensity - 0.3): a known answer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.mean(dim=(1, 2, 3, 4)) - 0.3) * 20.0      # GAIN
        return torch.stack([-z, z], dim=1)


@pytest.fixture(scope="module")
def series() -> synth.SyntheticSeries:
    spec = synth.SeriesSpec(slices=10, rows=32, columns=32, slice_thickness_mm=2.0)
    return synth.make_study(spec, seed=41).series[0]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cls") / "classifier.ts"
    torch.jit.script(_MeanClassifier()).save(str(path))  # type: ignore[no-untyped-call]
    return path


def _settings(path: Path, **extra: Any) -> ModelSettings:
    return ModelSettings.model_validate({"name": "cls", "path": path, "format": "torchscript",
                                         "version": "0.1", "window": WINDOW,
                                         "classes": CLASSES, **extra})


def _job(key: str) -> Job:
    when = datetime(2026, 1, 2, 3, 4, 5)
    return Job(1, key, "infer", "r", "1.2", None, 1, {}, JobStateValues.RUNNING, None, 50, 1,
               None, None, when, when)


def _expected(volume: Volume) -> float:
    lo, hi = WINDOW
    mean = float(((np.clip(volume.array, lo, hi) - lo) / (hi - lo)).mean())
    return 1.0 / (1.0 + math.exp(-2.0 * GAIN * (mean - 0.3)))


def test_torchscript_classifier_gives_class_probabilities(
        classifier: Path, series: synth.SyntheticSeries) -> None:
    volume = volume_from_datasets(series.datasets)
    prediction = TorchRunner(_settings(classifier)).predict(volume)
    assert prediction.labels is None
    assert prediction.class_probabilities is not None
    no, yes = prediction.class_probabilities
    assert yes == pytest.approx(_expected(volume), abs=1e-5)
    assert no + yes == pytest.approx(1.0)
    resized = TorchRunner(_settings(classifier, input_size=(8, 16, 16))).predict(volume)
    assert resized.class_probabilities is not None
    assert resized.class_probabilities[1] == pytest.approx(yes, abs=0.05)


def test_classifier_sr_carries_finding_and_probability(
        classifier: Path, series: synth.SyntheticSeries, tmp_path: Path) -> None:
    volume = volume_from_datasets(series.datasets)
    runner = TorchRunner(_settings(classifier))
    prediction = runner.predict(volume)
    folder = tmp_path / "src"
    files = _write(series, folder)
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    ordered = [by_uid[u] for u in volume.sop_instance_uids]
    out = tmp_path / "out"
    out.mkdir()
    written = encode_results(_job("job-cls"), prediction, volume, ordered, runner.info, out)
    assert [p.name for p in written] == ["sr.dcm"]              # a classifier gives no SEG
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy is not installed (Debian package dicom3tools)")
    check = subprocess.run(["dciodvfy", str(written[0])], capture_output=True, text=True,
                           timeout=60)
    assert [x for x in (check.stdout + check.stderr).splitlines() if "Error" in x] == []
    sr = hd.sr.srread(written[0])
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 2
    found = {}
    for group in groups:
        code = group.finding_type
        probability = group.get_measurements(
            name=hd.sr.CodedConcept("122157", "DCM", "Probability"))[0]
        presence = group.get_qualitative_evaluations()[0]
        found[(code.value, code.scheme_designator)] = (probability.value, presence.value.value)
    no, yes = prediction.class_probabilities or (0.0, 0.0)
    assert found[("52988006", "SCT")][0] == pytest.approx(yes, abs=1e-6)
    assert found[("260413007", "SCT")][0] == pytest.approx(no, abs=1e-6)
    winner = "52988006" if yes > no else "260413007"
    assert {k[0]: v[1] for k, v in found.items()}[winner] == "121053"   # DCM Present


def _write(series: synth.SyntheticSeries, folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i, ds in enumerate(series.datasets):
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_bad_classifier_output_and_config_are_named(
        classifier: Path, series: synth.SyntheticSeries, tmp_path: Path) -> None:
    volume = volume_from_datasets(series.datasets)
    three = [*CLASSES, {"name": "other", "finding": {"value": "74964007", "scheme": "SCT",
                                                      "meaning": "Other"}}]
    with pytest.raises(ModelError, match=r"shape \(1, 3\)"):
        TorchRunner(_settings(classifier, classes=three)).predict(volume)
    runner = TorchRunner(_settings(classifier))
    with pytest.raises(ResultError, match="one per declared class"):
        build_sr(None, series.datasets, None, None, None, [], model="cls", version="0.1",
                 weights_sha256="ab" * 32, job_key="j", classes=runner.info.classes,
                 class_probabilities=[1.0], sop_instance_uids=volume.sop_instance_uids)
    with pytest.raises(ResultError, match="got neither"):
        build_sr(None, series.datasets, None, None, None, [], model="cls", version="0.1",
                 weights_sha256="ab" * 32, job_key="j",
                 sop_instance_uids=volume.sop_instance_uids)


def test_a_model_that_segments_and_classifies_gets_both_in_one_sr(
        series: synth.SyntheticSeries, tmp_path: Path) -> None:
    from node.inference.runner import ClassSpec, LabelSpec
    from node.results.seg import build_seg

    volume = volume_from_datasets(series.datasets)
    labels = series.present_mask().astype(np.uint8)
    assert labels.any()
    lesion = LabelSpec(1, "lesion", ("49755003", "SCT", "Morphologically abnormal structure"),
                       ("52988006", "SCT", "Lesion"))
    classes = [ClassSpec(0, "benign", ("30807003", "SCT", "Benign")),
               ClassSpec(1, "malignant", ("86049000", "SCT", "Malignant"))]
    common: dict[str, Any] = dict(model="both", version="1", weights_sha256="cd" * 32,
                                  job_key="job-both", sop_instance_uids=volume.sop_instance_uids)
    seg = build_seg(series.datasets, labels, [lesion], **common)
    sr = build_sr(seg, series.datasets, labels, volume.array, volume.spacing, [lesion],
                  classes=classes, class_probabilities=[0.25, 0.75], **common)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    assert [x for x in (check.stdout + check.stderr).splitlines() if "Error" in x] == []
    report = hd.sr.srread(path).content
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert [g.finding_type.value for g in volumetric] == ["52988006"]
    image = report.get_image_measurement_groups()
    probability = hd.sr.CodedConcept("122157", "DCM", "Probability")
    assert {g.finding_type.value: g.get_measurements(name=probability)[0].value
            for g in image} == {"30807003": 0.25, "86049000": 0.75}
