"""Results back to the PACS: SEG and TID 1500 SR from a prediction, checked by dicom3tools,
read back with highdicom, compared with the synthetic ground truth."""

from __future__ import annotations

import copy
import itertools
import re
import shutil
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.errors import ResultError
from node.inference.runner import LabelSpec
from node.inference.volume import Volume, volume_from_datasets
from node.results.seg import build_seg
from node.results.sr import build_sr, count_components
from node.results.uids import ResultUids, derive_uid
from node.synth import SeriesSpec, SyntheticSeries, make_study

ROOT = Path(__file__).resolve().parents[2]
SPEC = SeriesSpec(slices=40, rows=128, columns=128, pixel_spacing_mm=2.5, slice_thickness_mm=3.0)
LESION = LabelSpec(1, "lesion", ("49755003", "SCT", "Morphologically abnormal structure"),
                   ("52988006", "SCT", "Lesion"))
ORGAN = LabelSpec(2, "organ", ("123037004", "SCT", "Anatomical Structure"),
                  ("10200004", "SCT", "Liver"))
WHEN = datetime(2026, 1, 2, 3, 4, 5)
PROVENANCE: dict[str, Any] = dict(model="lesion-ct", version="1.2.0", weights_sha256="ab" * 32,
                                  content_datetime=WHEN)


@dataclass(frozen=True)
class Case:
    series: SyntheticSeries
    volume: Volume
    labels: npt.NDArray[np.uint8]
    seg: hd.seg.Segmentation
    sr: hd.sr.Comprehensive3DSR
    folder: Path


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _results(case_series: SyntheticSeries, volume: Volume, labels: npt.NDArray[np.uint8],
             specs: list[LabelSpec], job_key: str = "job-1", **kwargs: Any,
             ) -> tuple[hd.seg.Segmentation | None, hd.sr.Comprehensive3DSR]:
    seg = build_seg(case_series.datasets, labels, specs, job_key=job_key, **PROVENANCE)
    sr = build_sr(seg, case_series.datasets, labels, volume.array, volume.spacing, specs,
                  job_key=job_key, **PROVENANCE, **kwargs)
    return seg, sr


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    series = make_study(SPEC).series[0]
    volume = volume_from_datasets(series.datasets)
    assert volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in series.datasets)
    labels = series.present_mask().astype(np.uint8)
    seg, sr = _results(series, volume, labels, [LESION])
    assert seg is not None
    folder = tmp_path_factory.mktemp("results")
    for ds in series.datasets:
        _write(ds, folder / f"src{int(ds.InstanceNumber):04d}.dcm")
    _write(seg, folder / "seg.dcm")
    _write(sr, folder / "sr.dcm")
    return Case(series, volume, labels, seg, sr, folder)


def _tool(name: str, *args: Path) -> list[str]:
    if shutil.which(name) is None:
        pytest.fail(f"{name} is not installed (Debian package dicom3tools)")
    done = subprocess.run([name, *map(str, args)], capture_output=True, text=True, timeout=60)
    return (done.stdout + done.stderr).splitlines()


def _report(sr: Dataset) -> Any:
    """The TID 1500 content of an SR read back (highdicom types it as a plain sequence)."""
    return sr.content


def _errors(lines: list[str]) -> list[str]:
    return [line for line in lines if "error" in line.lower()]


# -- uids ------------------------------------------------------------------------------------

def test_derived_uids_are_stable_valid_and_distinct() -> None:
    uid = derive_uid("seg-series", "job-1", "m", "1")
    assert uid == derive_uid("seg-series", "job-1", "m", "1")
    assert re.fullmatch(r"2\.25\.(0|[1-9]\d*)", uid) and len(uid) <= 64
    assert derive_uid("a|b", "c") != derive_uid("a", "b|c")
    uids = ResultUids.for_job("job-1", "m", "1")
    assert len({uids.seg_series, uids.seg_instance, uids.sr_series, uids.sr_instance}) == 4
    assert ResultUids.for_job("job-1", "m", "2").sr_instance != uids.sr_instance
    with pytest.raises(ValueError):
        derive_uid()


# -- conformance -----------------------------------------------------------------------------

def test_seg_and_sr_pass_dciodvfy(case: Case) -> None:
    for name in ("seg.dcm", "sr.dcm"):
        assert _errors(_tool("dciodvfy", case.folder / name)) == [], name


def test_source_seg_and_sr_are_one_consistent_study_for_dcentvfy(case: Case) -> None:
    files = sorted(case.folder.glob("*.dcm"))
    assert len(files) == SPEC.slices + 2
    assert _errors(_tool("dcentvfy", *files)) == []


# -- SEG -------------------------------------------------------------------------------------

def test_seg_reads_back_voxel_for_voxel(case: Case) -> None:
    seg = hd.seg.segread(case.folder / "seg.dcm")
    source = case.series.datasets[0]
    assert (seg.StudyInstanceUID, seg.PatientID) == (source.StudyInstanceUID, source.PatientID)
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.SegmentationType == "BINARY"
    assert int(seg.NumberOfFrames) == int(np.count_nonzero(case.labels.any(axis=(1, 2))))
    mask = seg.get_pixels_by_source_instance(list(case.volume.sop_instance_uids),
                                             combine_segments=True)
    np.testing.assert_array_equal(mask, case.labels)
    (segment,) = seg.SegmentSequence
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "SCT"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("lesion-ct", "1.2.0")
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == \
        codes.cid7162.ArtificialIntelligence.value
    assert "ab" * 32 in algorithm.AlgorithmParameters


def test_seg_follows_the_volume_order_not_the_file_order(case: Case) -> None:
    shuffled = list(reversed(case.series.datasets))
    with pytest.raises(ResultError, match="not in volume order"):
        build_seg(shuffled, case.labels, [LESION], job_key="job-1", **PROVENANCE)
    seg = build_seg(shuffled, case.labels, [LESION], job_key="job-1",
                    sop_instance_uids=case.volume.sop_instance_uids, **PROVENANCE)
    assert seg is not None and seg.PixelData == case.seg.PixelData


def test_seg_refuses_what_it_cannot_write(case: Case) -> None:
    with pytest.raises(ResultError, match=r"values \[3\] have no LabelSpec"):
        build_seg(case.series.datasets, case.labels * 3, [LESION], job_key="j", **PROVENANCE)
    with pytest.raises(ResultError, match="one data set per slice"):
        build_seg(case.series.datasets[1:], case.labels, [LESION], job_key="j", **PROVENANCE)
    multi = list(case.series.datasets)
    multi[0] = copy.deepcopy(multi[0])
    multi[0].NumberOfFrames = 2
    with pytest.raises(ResultError, match="multi-frame"):
        build_seg(multi, case.labels, [LESION], job_key="j", **PROVENANCE)


# -- SR --------------------------------------------------------------------------------------

def _measurements(group: Any) -> dict[str, float]:
    found = {}
    for m in group.get_measurements():
        key = m.name.meaning if m.derivation is None else m.derivation.meaning
        found[key] = float(m.value)
    return found


def test_sr_reads_back_and_references_seg_and_source(case: Case) -> None:
    sr = hd.sr.srread(case.folder / "sr.dcm")
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert "AI result, not a diagnosis" in sr.SeriesDescription
    assert sr.StudyInstanceUID == case.series.datasets[0].StudyInstanceUID
    (group,) = _report(sr).get_volumetric_roi_measurement_groups()
    segment = group.referenced_segment
    assert segment is not None
    assert segment.referenced_sop_instance_uid == case.seg.SOPInstanceUID
    assert segment.referenced_sop_class_uid == case.seg.SOPClassUID
    assert segment.referenced_segment_numbers == [1]
    assert segment.source_series_for_segmentation.value == case.series.series_instance_uid
    assert group.tracking_uid == case.seg.SegmentSequence[0].TrackingUID
    evidence = {item.ReferencedSOPInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    assert evidence == {case.seg.SOPInstanceUID, *case.volume.sop_instance_uids}
    observer = _report(sr).get_observer_contexts(observer_type=codes.DCM.Device)[0]
    device = observer.observer_identifying_attributes
    assert (device.name, device.model_name, device.serial_number) == \
        ("lesion-ct 1.2.0", "lesion-ct", "ab" * 32)


def test_sr_measurements_match_the_ground_truth(case: Case) -> None:
    (group,) = _report(hd.sr.srread(case.folder / "sr.dcm")) \
        .get_volumetric_roi_measurement_groups()
    found = _measurements(group)
    truth = case.series.lesion_volume_mm3
    assert abs(found["Volume"] - truth) <= 0.1 * truth
    assert found["Number of lesions (observable entity)"] == len(case.series.lesions)
    inside = case.volume.array[case.labels == 1]
    assert found["Mean"] == pytest.approx(float(inside.mean()), abs=0.01)
    assert (found["Minimum"], found["Maximum"]) == (float(inside.min()), float(inside.max()))
    painted = [lesion.intensity for lesion in case.series.lesions]
    assert min(painted) - 60 < found["Mean"] < max(painted) + 60  # HU, with image noise


def test_same_inputs_give_the_same_objects_and_a_new_version_new_uids(case: Case) -> None:
    seg, sr = _results(case.series, case.volume, case.labels, [LESION])
    assert seg is not None
    for again, first in ((seg, case.seg), (sr, case.sr)):
        assert (again.SeriesInstanceUID, again.SOPInstanceUID) == \
            (first.SeriesInstanceUID, first.SOPInstanceUID)
    assert _write(seg, case.folder / "again.seg").read_bytes() == \
        (case.folder / "seg.dcm").read_bytes()
    assert _write(sr, case.folder / "again.sr").read_bytes() == \
        (case.folder / "sr.dcm").read_bytes()
    other = build_seg(case.series.datasets, case.labels, [LESION], job_key="job-1",
                      **{**PROVENANCE, "version": "1.3.0"})
    assert other is not None and other.SOPInstanceUID != case.seg.SOPInstanceUID


def test_a_rerun_supersedes_its_predecessor(case: Case, tmp_path: Path) -> None:
    _, sr = _results(case.series, case.volume, case.labels, [LESION], job_key="job-1#2",
                     predecessor=case.sr)
    path = _write(sr, tmp_path / "sr2.dcm")
    assert _errors(_tool("dciodvfy", path)) == []
    (study,) = pydicom.dcmread(path).PredecessorDocumentsSequence
    assert study.StudyInstanceUID == case.sr.StudyInstanceUID
    item = study.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == \
        (case.sr.SOPClassUID, case.sr.SOPInstanceUID)
    assert sr.SOPInstanceUID != case.sr.SOPInstanceUID
    with pytest.raises(ResultError, match="is the UID of the SR being written"):
        _results(case.series, case.volume, case.labels, [LESION], predecessor=case.sr)
    with pytest.raises(ResultError, match="expected an SR document"):
        _results(case.series, case.volume, case.labels, [LESION], job_key="job-1#3",
                 predecessor=case.series.datasets[0])


def test_an_empty_prediction_gives_no_seg_and_an_sr_that_says_so(case: Case,
                                                                  tmp_path: Path) -> None:
    empty = np.zeros_like(case.labels)
    seg, sr = _results(case.series, case.volume, empty, [LESION], job_key="job-empty")
    assert seg is None
    path = _write(sr, tmp_path / "sr.dcm")
    assert _errors(_tool("dciodvfy", path)) == []
    read = hd.sr.srread(path)
    assert _report(read).get_volumetric_roi_measurement_groups() == []
    (group,) = _report(read).get_image_measurement_groups()
    assert group.finding_type.value == "52988006"
    assert _measurements(group) == {"Volume": 0.0, "Number of lesions (observable entity)": 0.0}
    with pytest.raises(ResultError, match="no SEG was given"):
        build_sr(None, case.series.datasets, case.labels, case.volume.array,
                 case.volume.spacing, [LESION], job_key="job-1", **PROVENANCE)


def test_only_labels_with_voxels_get_a_segment(case: Case, tmp_path: Path) -> None:
    labels = case.labels * 2  # only ORGAN (value 2) present
    seg, sr = _results(case.series, case.volume, labels, [LESION, ORGAN], job_key="job-two")
    assert seg is not None
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["organ"]
    paths = [_write(seg, tmp_path / "seg.dcm"), _write(sr, tmp_path / "sr.dcm")]
    back = hd.seg.segread(paths[0]).get_pixels_by_source_instance(
        list(case.volume.sop_instance_uids), combine_segments=True)
    np.testing.assert_array_equal(back, labels == 2)     # label 2 written as segment 1
    for path in paths:
        assert _errors(_tool("dciodvfy", path)) == [], path.name
    read = hd.sr.srread(paths[1])
    (volumetric,) = _report(read).get_volumetric_roi_measurement_groups()
    assert volumetric.tracking_identifier == "organ"
    assert volumetric.referenced_segment.referenced_segment_numbers == [1]
    (empty,) = _report(read).get_image_measurement_groups()
    assert empty.tracking_identifier == "lesion"
    assert empty.tracking_uid != volumetric.tracking_uid == seg.SegmentSequence[0].TrackingUID


# -- connected components --------------------------------------------------------------------

def _bfs_count(mask: npt.NDArray[np.bool_]) -> int:
    seen = np.zeros_like(mask)
    count = 0
    steps = [d for d in itertools.product((-1, 0, 1), repeat=3) if d != (0, 0, 0)]
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        seen[start] = True
        todo = deque([start])
        while todo:
            k, r, c = todo.popleft()
            for dk, dr, dc in steps:
                n = (k + dk, r + dr, c + dc)
                if all(0 <= i < s for i, s in zip(n, mask.shape)) and mask[n] and not seen[n]:
                    seen[n] = True
                    todo.append(n)
    return count


def test_count_components_uses_26_connectivity() -> None:
    mask = np.zeros((5, 5, 5), dtype=bool)
    assert count_components(mask) == 0
    mask[0, 0, 0] = mask[1, 1, 1] = True  # corners touch: one component
    assert count_components(mask) == 1
    mask[4, 4, 4] = True
    assert count_components(mask) == 2
    rng = np.random.default_rng(7)
    for density in (0.1, 0.25, 0.4):
        random = rng.uniform(size=(9, 11, 10)) < density
        assert count_components(random) == _bfs_count(random)
    spiral = np.zeros((1, 9, 9), dtype=bool)  # one long winding component
    spiral[0, 0, :] = spiral[0, :, 8] = spiral[0, 8, :] = spiral[0, 2:, 0] = True
    spiral[0, 2, :7] = spiral[0, 2:7, 6] = spiral[0, 6, 2:7] = True
    assert count_components(spiral) == _bfs_count(spiral) == 1
    # scattered voxels in a large box (what a model's false positives look like): the
    # sparse neighbour search, not the dense lookup grid
    scattered = np.zeros((40, 50, 60), dtype=bool)
    for k, r, c in rng.integers(0, (39, 49, 59), size=(60, 3)):
        scattered[k, r, c] = scattered[k + 1, r + 1, c + 1] = True   # diagonal pairs
    scattered[0, 0, 0] = scattered[39, 49, 59] = True                 # corners of the box
    assert count_components(scattered) == _bfs_count(scattered)


def test_results_never_import_the_inference_stack() -> None:
    code = ("import sys, node.results.seg, node.results.sr, node.results.warm; "
            "print(sorted(m for m in ('torch', 'monai', 'node.inference') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout.strip()
    assert out == "[]"


def test_mr_intensities_are_reported_without_unit(tmp_path: Path) -> None:
    series = make_study(SeriesSpec(modality="MR", slices=16, rows=64, columns=64,
                                   pixel_spacing_mm=4.0, slice_thickness_mm=4.0)).series[0]
    volume = volume_from_datasets(series.datasets)
    labels = series.present_mask().astype(np.uint8)
    seg, sr = _results(series, volume, labels, [LESION], job_key="job-mr")
    assert seg is not None
    path = _write(sr, tmp_path / "sr.dcm")
    assert _errors(_tool("dciodvfy", path)) == []
    (group,) = _report(hd.sr.srread(path)).get_volumetric_roi_measurement_groups()
    means = [m for m in group.get_measurements()
             if m.derivation is not None and m.derivation == codes.SCT.Mean]
    assert [(m.name, m.unit) for m in means] == [(codes.DCM.MRSignalIntensity, codes.UCUM.NoUnits)]
    assert means[0].value == pytest.approx(float(volume.array[labels == 1].mean()), abs=0.01)


def test_fractional_seg_carries_probabilities(case: Case, tmp_path: Path) -> None:
    mask = case.labels.astype(np.float32)
    rng = np.random.default_rng(5)
    probabilities = np.clip(mask * 0.9 + rng.uniform(0, 0.05, mask.shape), 0, 1)[None]
    seg = build_seg(case.series.datasets, case.labels, [LESION], job_key="job-frac",
                    probabilities=probabilities.astype(np.float16), **PROVENANCE)
    assert seg is not None and seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY"
    path = _write(seg, tmp_path / "frac.dcm")
    assert _errors(_tool("dciodvfy", path)) == []
    back = hd.seg.segread(path)
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(d.SOPInstanceUID) for d in case.series.datasets],
        segment_numbers=[1], combine_segments=False, rescale_fractional=True,
        skip_overlap_checks=True)[..., 0]
    # 8-bit quantisation (MaximumFractionalValue 255): within 1/255 of what was written
    assert np.abs(pixels - probabilities[0]).max() <= 1 / 255 + 1e-3


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.bool_, np.int16])
def test_label_counts_agree_with_unique(dtype: Any) -> None:
    from node.results.seg import label_counts
    rng = np.random.default_rng(4)
    labels = rng.integers(-2 if dtype == np.int16 else 0, 2 if dtype == np.bool_ else 5,
                          size=(6, 7, 8)).astype(dtype)
    found, counts = np.unique(labels, return_counts=True)
    assert label_counts(labels) == {int(v): int(n) for v, n in zip(found, counts, strict=True)}
    assert label_counts(np.zeros((0, 3, 3), dtype=dtype)) == {}
