"""Series to volume: order by position, geometry, rescale, refusals, decoding, multi-frame."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from pydicom.valuerep import format_number_as_ds

from node.errors import VolumeError
from node.inference.volume import Volume, load_volume, volume_from_datasets
from node.synth import Lesion, SeriesSpec, SyntheticSeries, make_study, write_study

LESION_HU = 150.0
SPEC = SeriesSpec(slices=12, rows=32, columns=32, pixel_spacing_mm=2.0, slice_thickness_mm=2.5,
                  lesions=(Lesion((0.0, 0.0, 0.0), 8.0, LESION_HU),))


@pytest.fixture(scope="module")
def series() -> SyntheticSeries:
    return make_study(SPEC).series[0]


def _copies(series: SyntheticSeries) -> list[Dataset]:
    return [copy.deepcopy(ds) for ds in series.datasets]


def _ds(values: Sequence[float]) -> list[str]:
    return [format_number_as_ds(round(float(v), 8) + 0.0) for v in values]


def _refused(datasets: Sequence[Dataset], uid: str, *words: str, tolerance: float = 0.05) -> str:
    with pytest.raises(VolumeError) as info:
        volume_from_datasets(datasets, spacing_tolerance=tolerance)
    message = str(info.value)
    assert message.startswith(f"series {uid}: "), message
    for word in words:
        assert word in message, message
    return message


def _rotation(axis: Sequence[float], degrees: float) -> npt.NDArray[np.float64]:
    """Rodrigues' rotation matrix."""
    a = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.radians(degrees)
    return np.asarray(np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k, dtype=np.float64)


def _assert_affine_matches_files(vol: Volume, datasets: Sequence[Dataset]) -> None:
    """Voxel centres through the affine equal the centres the file attributes define."""
    for ds in datasets:
        k = vol.sop_instance_uids.index(ds.SOPInstanceUID)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        for r, c in ((0, 0), (0, ds.Columns - 1), (ds.Rows - 1, 0), (7, 19)):
            expected = ipp + c * dc * iop[:3] + r * dr * iop[3:]
            got = vol.affine @ np.array([c, r, k, 1.0])
            np.testing.assert_allclose(got[:3], expected, atol=1e-4)
        assert got[3] == 1.0


def test_shuffled_files_and_instance_numbers_give_the_sorted_volume(
        series: SyntheticSeries, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    perm = rng.permutation(len(series.datasets))
    paths = []
    for ds, number in zip(_copies(series), perm):
        ds.InstanceNumber = int(number) + 1  # lies about the order; must be ignored
        path = tmp_path / f"{number:03d}.dcm"  # file names in yet another order
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    shuffled = load_volume([paths[i] for i in rng.permutation(len(paths))])
    in_order = volume_from_datasets(series.datasets)
    assert not (perm == np.arange(perm.size)).all()
    np.testing.assert_array_equal(shuffled.array, in_order.array)
    np.testing.assert_array_equal(shuffled.affine, in_order.affine)
    assert shuffled.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in series.datasets)


def test_array_follows_position_and_lines_up_with_the_lesion_mask(
        series: SyntheticSeries) -> None:
    vol = volume_from_datasets(list(reversed(series.datasets)))
    assert vol.array.dtype == np.float32 and vol.array.shape == (12, 32, 32)
    assert not vol.array.flags.writeable and not vol.sheared
    z = [float(ds.ImagePositionPatient[2]) for ds in series.datasets]
    assert z == sorted(z)  # synth writes InstanceNumber in position order
    for k, ds in enumerate(series.datasets):
        np.testing.assert_array_equal(vol.array[k], ds.pixel_array.astype(np.float32) - 1024)
    mask = series.lesion_mask
    assert abs(float(vol.array[mask].mean()) - LESION_HU) < 5.0
    assert float(vol.array[~mask].mean()) < LESION_HU - 100
    assert vol.spacing == (2.5, 2.0, 2.0)
    assert vol.frame_numbers == (1,) * 12 and vol.modality == "CT"
    assert vol.series_instance_uid == series.series_instance_uid
    np.testing.assert_allclose(vol.affine[:3, :3], np.diag([2.0, 2.0, 2.5]))
    _assert_affine_matches_files(vol, series.datasets)


@pytest.mark.parametrize("orientation", ["sagittal", "coronal"])
def test_synth_reformats_map_voxels_to_their_file_positions(orientation: str) -> None:
    spec = SeriesSpec(slices=6, rows=24, columns=20, orientation=orientation, seed=3)
    s = make_study(spec).series[0]
    vol = volume_from_datasets(list(reversed(s.datasets)))
    _assert_affine_matches_files(vol, s.datasets)
    assert vol.array.shape == (6, 24, 20)


def test_oblique_orientation_is_carried_by_the_affine(series: SyntheticSeries) -> None:
    rot = _rotation((1.0, 2.0, 0.5), 30.0)
    datasets = _copies(series)
    for ds in datasets:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        ds.ImageOrientationPatient = _ds([*(rot @ iop[:3]), *(rot @ iop[3:])])
        ds.ImagePositionPatient = _ds(rot @ np.array([float(v) for v in ds.ImagePositionPatient]))
    vol = volume_from_datasets(datasets[::2] + datasets[1::2])
    straight = volume_from_datasets(series.datasets)
    np.testing.assert_array_equal(vol.array, straight.array)
    np.testing.assert_allclose(vol.affine[:3, :3], rot @ straight.affine[:3, :3], atol=1e-5)
    assert not vol.sheared
    _assert_affine_matches_files(vol, datasets)


def _tilted(series: SyntheticSeries, degrees: float) -> list[Dataset]:
    """Gantry tilt: each slice shifted along the column direction by k * t * tan(tilt)."""
    datasets = _copies(series)
    shift = SPEC.slice_thickness_mm * np.tan(np.radians(degrees))
    for k, ds in enumerate(datasets):
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        ds.ImagePositionPatient = _ds(ipp + np.array([0.0, k * shift, 0.0]))
        ds.GantryDetectorTilt = format_number_as_ds(degrees)
    return datasets


def test_gantry_tilt_is_handled_with_a_sheared_affine(series: SyntheticSeries) -> None:
    """Decision: handled, not refused. The third affine column is the actual step between
    slice positions, so each slice still maps onto its source image."""
    datasets = _tilted(series, 15.0)
    vol = volume_from_datasets(datasets[::-1])
    assert vol.sheared
    step = np.array([0.0, 2.5 * np.tan(np.radians(15.0)), 2.5])
    np.testing.assert_allclose(vol.affine[:3, 2], step, atol=1e-6)
    assert vol.spacing[0] == pytest.approx(2.5)  # distance between the planes
    np.testing.assert_array_equal(vol.array, volume_from_datasets(series.datasets).array)
    _assert_affine_matches_files(vol, datasets)
    upright = volume_from_datasets(series.datasets)
    assert not upright.sheared
    np.testing.assert_allclose(upright.affine[:3, 2], [0.0, 0.0, 2.5])


def test_uneven_tilt_is_refused(series: SyntheticSeries) -> None:
    datasets = _tilted(series, 15.0)
    ipp = [float(v) for v in datasets[5].ImagePositionPatient]
    datasets[5].ImagePositionPatient = _ds([ipp[0] + 3.0, ipp[1], ipp[2]])
    _refused(datasets, series.series_instance_uid, "do not lie on one line", "z=")


def test_missing_slices_are_named() -> None:
    s = make_study(SeriesSpec(slices=10, rows=16, columns=16, omit_instance_numbers=(4, 5),
                              lesions=())).series[0]
    message = _refused(s.datasets, s.series_instance_uid, "missing slice(s) between z=",
                       "about 2 slice(s)")
    z = [float(ds.ImagePositionPatient[2]) for ds in s.datasets]
    assert f"z={z[2]:.2f} and z={z[3]:.2f} mm" in message


def test_irregular_spacing_is_refused_unless_within_tolerance(series: SyntheticSeries) -> None:
    datasets = _copies(series)
    ipp = [float(v) for v in datasets[6].ImagePositionPatient]
    datasets[6].ImagePositionPatient = _ds([ipp[0], ipp[1], ipp[2] + 0.3 * 2.5])
    message = _refused(datasets, series.series_instance_uid, "irregular spacing")
    assert "missing" not in message
    assert volume_from_datasets(datasets, spacing_tolerance=0.35).array.shape[0] == 12


def test_mixed_orientation_names_both(series: SyntheticSeries) -> None:
    datasets = _copies(series)
    rot = _rotation((0.0, 0.0, 1.0), 2.0)
    datasets[3].ImageOrientationPatient = _ds([*(rot @ [1.0, 0, 0]), *(rot @ [0, 1.0, 0])])
    message = _refused(datasets, series.series_instance_uid, "mixed orientations",
                       "[1, 0, 0, 0, 1, 0]", "[0.999391, 0.0348995, 0")
    assert re.search(r"in instance [\d.]+ and \[", message)


@pytest.mark.parametrize(("change", "words"), [
    (lambda ds: setattr(ds, "Rows", 16), ("mixed matrix sizes", "32x32", "16x32")),
    (lambda ds: setattr(ds, "PixelSpacing", ["2.0", "2.2"]), ("mixed PixelSpacing", "2.2")),
    (lambda ds: delattr(ds, "ImagePositionPatient"), ("ImagePositionPatient is missing",)),
    (lambda ds: delattr(ds, "ImageOrientationPatient"), ("ImageOrientationPatient is missing",)),
    (lambda ds: delattr(ds, "PixelSpacing"), ("PixelSpacing is missing",)),
])
def test_inconsistent_or_missing_geometry_is_refused(
        series: SyntheticSeries, change: Callable[[Dataset], None],
        words: tuple[str, ...]) -> None:
    datasets = _copies(series)
    change(datasets[-1])
    _refused(datasets, series.series_instance_uid, *words)


def test_degenerate_orientation_is_refused(series: SyntheticSeries) -> None:
    datasets = _copies(series)
    for ds in datasets:
        ds.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]
    _refused(datasets, series.series_instance_uid, "[1, 0, 0, 1, 0, 0]",
             "not two orthogonal unit vectors")


def test_repeated_instance_is_dropped_but_a_second_image_in_one_plane_is_refused(
        series: SyntheticSeries) -> None:
    datasets = _copies(series)
    assert volume_from_datasets([*datasets, datasets[4]]).array.shape[0] == 12
    echo = copy.deepcopy(datasets[4])
    echo.SOPInstanceUID = datasets[4].SOPInstanceUID + ".2"
    _refused([*datasets, echo], series.series_instance_uid, "2 slices share position z=")


def test_rescale_is_applied_per_slice(series: SyntheticSeries) -> None:
    datasets = _copies(series)
    for k, ds in enumerate(datasets):
        ds.RescaleSlope, ds.RescaleIntercept = format_number_as_ds(0.5 * (k + 1)), str(-10 * k)
    vol = volume_from_datasets(datasets[::-1])
    for k, ds in enumerate(datasets):
        expected = ds.pixel_array.astype(np.float64) * 0.5 * (k + 1) - 10 * k
        np.testing.assert_array_equal(vol.array[k], expected.astype(np.float32))


def test_single_slice_uses_slice_thickness() -> None:
    path = get_testdata_file("CT_small.dcm", download=False)
    assert isinstance(path, str)
    vol = load_volume([Path(path)])
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(vol.array[0], ds.pixel_array.astype(np.float32) - 1024)
    assert vol.spacing[0] == 5.0 and vol.array.shape == (1, 128, 128)
    np.testing.assert_allclose(vol.affine[:3, 2], [0.0, 0.0, 5.0])


@pytest.mark.parametrize("twin", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm"])
def test_pydicom_compressed_twins_decode_to_the_same_pixels(twin: str) -> None:
    paths = [get_testdata_file(n, download=False) for n in ("MR_small.dcm", twin)]
    assert all(isinstance(p, str) for p in paths)
    plain, packed = (load_volume([Path(str(p))]) for p in paths)
    assert pydicom.dcmread(str(paths[1])).file_meta.TransferSyntaxUID.is_compressed
    assert packed.array.shape == (1, 64, 64)
    np.testing.assert_array_equal(packed.array, plain.array)
    np.testing.assert_array_equal(packed.affine, plain.affine)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_synth_series_compressed_decode_to_the_same_pixels(syntax: UID, tmp_path: Path) -> None:
    study = make_study(SeriesSpec(slices=5, rows=40, columns=36, seed=1))
    plain = load_volume(write_study(study, tmp_path / "plain"))
    paths = write_study(study, tmp_path / "packed", transfer_syntax=str(syntax))
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    packed = load_volume(paths[::-1])
    np.testing.assert_array_equal(packed.array, plain.array)


def test_undecodable_pixel_data_names_the_file_and_transfer_syntax(
        series: SyntheticSeries, tmp_path: Path) -> None:
    ds = copy.deepcopy(series.datasets[0])
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + b"\x00" * 60 + b"garbage"])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "broken.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    with pytest.raises(VolumeError, match=r"^series .*: cannot decode the pixel data of "
                       rf"{re.escape(str(path))} \(SOP Instance UID .*RLE Lossless"):
        load_volume([path])


def test_load_volume_picks_one_series_and_refuses_a_mixture(tmp_path: Path) -> None:
    study = make_study(SeriesSpec(slices=4, rows=16, columns=16),
                       SeriesSpec(slices=3, rows=16, columns=16, series_number=2))
    paths = write_study(study, tmp_path)
    second = study.series[1].series_instance_uid
    vol = load_volume(paths, series_instance_uid=second)
    assert vol.series_instance_uid == second and vol.array.shape == (3, 16, 16)
    with pytest.raises(VolumeError, match="other series"):
        load_volume(paths)
    with pytest.raises(VolumeError, match=r"^series 1\.2\.3: no instances"):
        load_volume(paths, series_instance_uid="1.2.3")


def _enhanced(datasets: Sequence[Dataset], order: Sequence[int], *,
              per_frame_rescale: bool = False) -> Dataset:
    """A minimal Enhanced CT Image (PS3.3 A.38) holding ``datasets`` as frames in ``order``."""
    src = datasets[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = src.SOPInstanceUID + ".9"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "Modality",
                    "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
                    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(ds, keyword, src[keyword].value)
    ds.NumberOfFrames = len(order)
    shared = Dataset()
    orientation, measures, rescale = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = src.ImageOrientationPatient
    measures.PixelSpacing, measures.SliceThickness = src.PixelSpacing, src.SliceThickness
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = "1", "-1024", "HU"
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for i in order:
        item, position, content = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = datasets[i].ImagePositionPatient
        content.InStackPositionNumber = i + 1
        item.PlanePositionSequence, item.FrameContentSequence = [position], [content]
        if per_frame_rescale:
            own = Dataset()
            own.RescaleSlope, own.RescaleIntercept, own.RescaleType = str(i + 1), "-1024", "HU"
            item.PixelValueTransformationSequence = [own]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = b"".join(datasets[i].PixelData for i in order)
    return ds


def test_enhanced_multiframe_equals_its_single_frame_source(series: SyntheticSeries) -> None:
    order = [int(i) for i in np.random.default_rng(3).permutation(12)]
    enhanced = _enhanced(series.datasets, order)
    source = volume_from_datasets(series.datasets)
    vol = volume_from_datasets([enhanced])
    np.testing.assert_array_equal(vol.array, source.array)
    np.testing.assert_allclose(vol.affine, source.affine)
    assert vol.spacing == source.spacing
    assert vol.sop_instance_uids == (enhanced.SOPInstanceUID,) * 12
    assert vol.frame_numbers == tuple(order.index(k) + 1 for k in range(12))
    enhanced.compress(RLELossless, generate_instance_uid=False)
    np.testing.assert_array_equal(volume_from_datasets([enhanced]).array, source.array)


def test_enhanced_multiframe_per_frame_rescale_and_missing_position(
        series: SyntheticSeries) -> None:
    enhanced = _enhanced(series.datasets, range(11, -1, -1), per_frame_rescale=True)
    vol = volume_from_datasets([enhanced])
    for k, ds in enumerate(series.datasets):
        expected = ds.pixel_array.astype(np.float64) * (k + 1) - 1024
        np.testing.assert_array_equal(vol.array[k], expected.astype(np.float32))
    del enhanced.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    _refused([enhanced], series.series_instance_uid, "frame 3",
             "PlanePositionSequence ImagePositionPatient is missing")


def _resident_pages(path: Path) -> tuple[int, int]:
    """(pages in the page cache, pages) of a file, by mincore(2)."""
    import ctypes
    import mmap
    import os
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        vec = ctypes.create_string_buffer(pages)
        assert libc.mincore(address, size, vec) == 0, ctypes.get_errno()
        libc.munmap(address, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw), pages


def test_reading_a_series_first_asks_the_kernel_to_read_all_its_files_ahead(
        tmp_path: Path) -> None:
    """The receiver writes with O_DIRECT, so a study's files are on disk, not in memory;
    load_series starts the reads of every file before it reads the first."""
    import os
    import time
    from node.inference import volume as volume_module
    spec = SeriesSpec(slices=6, rows=128, columns=128, pixel_spacing_mm=0.7,
                      slice_thickness_mm=1.0, seed=2)
    files = write_study(make_study(spec, seed=2), tmp_path / "study")
    for path in files:                       # out of the page cache (clean, so droppable)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    if any(_resident_pages(p)[0] for p in files):
        pytest.skip("this filesystem keeps files in memory (tmpfs?): nothing to read ahead")
    volume_module._read_ahead([*files, tmp_path / "missing.dcm"])   # a missing one: no error
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
            _resident_pages(p)[0] < _resident_pages(p)[1] for p in files):
        time.sleep(0.01)
    assert [_resident_pages(p)[0] == _resident_pages(p)[1] for p in files] == [True] * len(files)
