"""Synthetic studies: geometry, ground truth, determinism, encodings, validators."""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from node.synth import (
    Lesion,
    PatientInfo,
    SeriesSpec,
    SyntheticSeries,
    available_transfer_syntaxes,
    iter_datasets,
    make_patient,
    make_series,
    make_study,
    parse_lesion,
    write_study,
)

SMALL = SeriesSpec(slices=20, rows=96, columns=96)
TISSUE = {"CT": 40.0, "MR": 450.0}
EXPECTED_IOP = {
    "axial": ((1, 0, 0), (0, 1, 0)),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
    "coronal": ((1, 0, 0), (0, 0, -1)),
}


def _voxel_centres(ds: Dataset) -> npt.NDArray[np.float64]:
    """Patient coordinates (rows, cols, 3) from the written attributes (PS3.3 C.7.6.2.1.1)."""
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    r = np.arange(ds.Rows)[:, None, None] * dr * iop[3:]
    c = np.arange(ds.Columns)[None, :, None] * dc * iop[:3]
    return np.asarray(ipp + r + c, dtype=np.float64)


def _values(ds: Dataset) -> npt.NDArray[np.float64]:
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)


def _volume(series: SyntheticSeries) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    points = np.stack([_voxel_centres(ds) for ds in series.datasets])
    return points, np.stack([_values(ds) for ds in series.datasets])


def _validator(tool: str, paths: list[Path]) -> list[str]:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} (dicom3tools) is not on PATH")
    proc = subprocess.run([tool, *map(str, paths)], check=False, capture_output=True, text=True,
                          timeout=120)
    return (proc.stdout + proc.stderr).splitlines()


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal"])
def test_geometry_follows_slice_normal(orientation: str) -> None:
    spec = replace(SMALL, orientation=orientation, pixel_spacing_mm=0.7, slice_thickness_mm=2.5)
    series = make_study(spec).series[0]
    row, col = (np.array(v, dtype=float) for v in EXPECTED_IOP[orientation])
    normal = np.cross(row, col)
    positions = []
    for ds in series.datasets:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        assert np.allclose(iop, [*row, *col])
        assert math.isclose(np.linalg.norm(iop[:3]), 1) and math.isclose(np.linalg.norm(iop[3:]), 1)
        assert abs(iop[:3] @ iop[3:]) < 1e-9
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        assert math.isclose(float(ds.SliceLocation), ipp @ normal, abs_tol=1e-4)
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 2.5
        assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.7]
        positions.append(ipp)
    steps = np.diff(np.array(positions), axis=0)
    assert np.allclose(steps, 2.5 * normal, atol=1e-4)  # along the normal, spacing == thickness
    assert [ds.InstanceNumber for ds in series.datasets] == list(range(1, 21))
    assert len({ds.FrameOfReferenceUID for ds in series.datasets}) == 1
    centre = np.mean([_voxel_centres(ds).mean(axis=(0, 1)) for ds in series.datasets], axis=0)
    assert np.allclose(centre, 0, atol=1e-3)  # volume centred on the patient origin


@pytest.mark.parametrize(("modality", "intensity"), [("CT", 130.0), ("MR", 900.0)])
def test_lesion_ground_truth_matches_pixels(modality: str, intensity: float) -> None:
    lesion = Lesion((12.0, -4.0, 1.0), 6.0, intensity)
    spec = replace(SMALL, modality=modality, lesions=(lesion,))
    series = make_study(spec).series[0]
    points, values = _volume(series)
    dist = np.linalg.norm(points - np.array(lesion.center_mm), axis=-1)
    assert np.array_equal(series.lesion_mask, dist <= lesion.radius_mm)  # voxel for voxel
    voxel_mm3 = 0.8 * 0.8 * 1.5
    assert series.lesion_volume_mm3 == pytest.approx(series.lesion_mask.sum() * voxel_mm3)
    sphere = 4 / 3 * math.pi * lesion.radius_mm**3
    assert abs(series.lesion_volume_mm3 - sphere) / sphere < 0.15
    shell = (dist > lesion.radius_mm + 1.5) & (dist < lesion.radius_mm + 4.0)
    assert values[series.lesion_mask].mean() == pytest.approx(intensity, abs=4)
    assert values[shell].mean() == pytest.approx(TISSUE[modality], abs=6)
    assert not series.lesion_mask.flags.writeable


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_lesions_lie_inside_and_show_in_pixels(seed: int) -> None:
    series = make_study(replace(SMALL, seed=seed)).series[0]
    assert 1 <= len(series.lesions) <= 3
    points, values = _volume(series)
    for lesion in series.lesions:
        inside = np.linalg.norm(points - np.array(lesion.center_mm), axis=-1) <= lesion.radius_mm
        assert inside.any() and np.all(series.lesion_mask[inside])
        assert abs(lesion.intensity - TISSUE["CT"]) >= 60
        assert values[inside].mean() == pytest.approx(lesion.intensity, abs=6)
    assert series.lesion_volume_mm3 > 0


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    specs = (SeriesSpec(slices=6, rows=64, columns=64),
             SeriesSpec(modality="MR", slices=5, rows=64, columns=48, series_number=2))
    first = write_study(make_study(*specs, seed=7), tmp_path / "a")
    second = write_study(make_study(*specs, seed=7), tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    other = make_study(*(SeriesSpec(slices=6, rows=64, columns=64, seed=1),), seed=8)
    base = make_study(specs[0], seed=7)
    assert other.study_instance_uid != base.study_instance_uid
    assert other.patient != base.patient
    assert other.series[0].datasets[0].PixelData != base.series[0].datasets[0].PixelData


def test_omitted_slices_are_absent_but_counted(tmp_path: Path) -> None:
    spec = replace(SMALL, omit_instance_numbers=(3, 7))
    series = make_study(spec).series[0]
    numbers = [ds.InstanceNumber for ds in series.datasets]
    assert numbers == [n for n in range(1, 21) if n not in (3, 7)]
    assert {ds.ImagesInAcquisition for ds in series.datasets} == {20}
    assert series.lesion_mask.shape == (20, 96, 96)
    assert np.array_equal(series.present_mask(), series.lesion_mask[[n - 1 for n in numbers]])
    write_study(make_study(spec), tmp_path)
    names = sorted(p.name for p in (tmp_path / "1").iterdir())
    assert "0003.dcm" not in names and "0004.dcm" in names and len(names) == 18


def test_written_files_read_back(tmp_path: Path) -> None:
    study = make_study(SeriesSpec(slices=4, rows=64, columns=64),
                       SeriesSpec(modality="MR", slices=3, rows=48, columns=64, series_number=5))
    paths = write_study(study, tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "1/0001.dcm", "1/0002.dcm", "1/0003.dcm", "1/0004.dcm",
        "5/0001.dcm", "5/0002.dcm", "5/0003.dcm"]
    for path, original in zip(paths, iter_datasets(study), strict=True):
        ds = pydicom.dcmread(path)  # no force: preamble and file meta present
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPInstanceUID == original.SOPInstanceUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.StudyInstanceUID == study.study_instance_uid
        assert ds.PatientID == study.patient.patient_id and ds.Manufacturer == "pacsnode-synth"
        assert np.array_equal(ds.pixel_array, original.pixel_array)
    ct, mr = (pydicom.dcmread(paths[0]), pydicom.dcmread(paths[-1]))
    assert list(ct.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert (ct.RescaleIntercept, ct.RescaleSlope, ct.BitsStored) == (-1024, 1, 12)
    assert mr.SOPClassUID.name == "MR Image Storage" and mr.MRAcquisitionType == "2D"
    assert ct.FrameOfReferenceUID != mr.FrameOfReferenceUID  # one frame of reference per modality


def test_dciodvfy_reports_no_errors(tmp_path: Path) -> None:
    study = make_study(SeriesSpec(slices=3, rows=64, columns=64),
                       SeriesSpec(modality="MR", slices=3, rows=64, columns=64, series_number=2),
                       SeriesSpec(slices=3, rows=64, columns=64, series_number=3,
                                  orientation="sagittal"))
    paths = write_study(study, tmp_path)
    for path in (paths[1], paths[4], paths[7]):
        errors = [line for line in _validator("dciodvfy", [path]) if "Error" in line]
        assert errors == [], f"{path}: {errors}"


def test_dcentvfy_accepts_the_whole_study(tmp_path: Path) -> None:
    study = make_study(SeriesSpec(slices=4, rows=64, columns=64),
                       SeriesSpec(slices=4, rows=64, columns=64, series_number=2,
                                  orientation="coronal"),
                       SeriesSpec(modality="MR", slices=4, rows=64, columns=64, series_number=3))
    lines = _validator("dcentvfy", write_study(study, tmp_path))
    assert [line for line in lines if "Error" in line] == []


@pytest.mark.parametrize("uid", [RLELossless, JPEG2000Lossless, JPEGLSLossless,
                                 ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_transfer_syntax_round_trip(uid: str, modality: str, tmp_path: Path) -> None:
    if uid not in available_transfer_syntaxes():
        pytest.skip(f"no encoder for {uid} installed")
    study = make_study(SeriesSpec(modality=modality, slices=2, rows=64, columns=80))
    for path, original in zip(write_study(study, tmp_path, transfer_syntax=uid),
                              iter_datasets(study), strict=True):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == uid
        assert ds.SOPInstanceUID == original.SOPInstanceUID
        assert np.array_equal(ds.pixel_array, original.pixel_array)
    assert study.series[0].datasets[0].file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_transfer_syntax_by_keyword_and_refusals(tmp_path: Path) -> None:
    study = make_study(SeriesSpec(slices=1, rows=32, columns=32))
    (path,) = write_study(study, tmp_path, transfer_syntax="RLELossless")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == RLELossless
    with pytest.raises(ValueError, match=JPEGBaseline8Bit.replace(".", r"\.")):
        write_study(study, tmp_path, transfer_syntax=JPEGBaseline8Bit)
    with pytest.raises(ValueError, match="'nonsense'"):
        write_study(study, tmp_path, transfer_syntax="nonsense")


def test_highdicom_builds_a_segmentation() -> None:
    hd = pytest.importorskip("highdicom")
    from pydicom.sr.codedict import codes

    series = make_study(SeriesSpec(slices=8, rows=64, columns=64,
                                   lesions=(Lesion((0.0, 0.0, 0.0), 4.0, 120.0),))).series[0]
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=list(series.datasets), pixel_array=series.lesion_mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=99,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="pacsnode",
        manufacturer_model_name="test", software_versions="0", device_serial_number="0")
    uids = [ds.SOPInstanceUID for ds in series.datasets]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1])
    assert np.array_equal(pixels[..., 0].astype(bool), series.lesion_mask)


def test_make_series_with_given_frame_of_reference() -> None:
    series = make_series(SeriesSpec(slices=2, rows=32, columns=32), patient=make_patient(3),
                         study_instance_uid="1.2.3", frame_of_reference_uid="1.2.3.4",
                         study_date="20250615")
    ds = series.datasets[0]
    assert (ds.FrameOfReferenceUID, ds.StudyDate, ds.StudyInstanceUID) == (
        "1.2.3.4", "20250615", "1.2.3")
    assert ds.PatientName == "SYNTH^PATIENT0003" and ds.PatientAge.endswith("Y")


def test_make_patient_is_deterministic_and_synthetic() -> None:
    assert make_patient(42) == make_patient(42)
    patient = make_patient(42)
    assert (patient.patient_name, patient.patient_id) == ("SYNTH^PATIENT0042", "SYN000042")
    assert PatientInfo() == make_patient(0)
    assert make_patient(1) != make_patient(2)
    with pytest.raises(ValueError, match="seed"):
        make_patient(-1)


@pytest.mark.parametrize(("text", "expected"), [
    ("1,2,3,4,5", Lesion((1.0, 2.0, 3.0), 4.0, 5.0)),
    (" -10.5, 0 ,7e1, 2.5, -80 ", Lesion((-10.5, 0.0, 70.0), 2.5, -80.0)),
])
def test_parse_lesion(text: str, expected: Lesion) -> None:
    assert parse_lesion(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("1,2,3,4", "expected 5 comma-separated"),
    ("1,2,zz,4,5", "z is not a number: 'zz'"),
    ("1,2,3,0,5", "radius_mm"),
    ("1,2,3,nan,5", "finite"),
])
def test_parse_lesion_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_lesion(text)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"modality": "US"}, "modality"),
    ({"orientation": "oblique"}, "orientation"),
    ({"slices": 0}, "slices"),
    ({"pixel_spacing_mm": -1.0}, "pixel_spacing_mm"),
    ({"slices": 4, "omit_instance_numbers": (5,)}, "omit_instance_numbers"),
    ({"slices": 2, "omit_instance_numbers": (1, 2)}, "omit_instance_numbers"),
    ({"seed": -3}, "seed"),
])
def test_series_spec_refuses(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"SeriesSpec.{field}"):
        SeriesSpec(**kwargs)  # type: ignore[arg-type]  # deliberately wrong values


def test_study_refuses_duplicate_series_numbers_and_bad_intensity() -> None:
    with pytest.raises(ValueError, match=r"specs\[1\].series_number"):
        make_study(SeriesSpec(slices=1), SeriesSpec(modality="MR", slices=1))
    with pytest.raises(ValueError, match=r"lesions\[0\].intensity"):
        make_study(SeriesSpec(slices=1, lesions=(Lesion((0.0, 0.0, 0.0), 2.0, 5000.0),)))
