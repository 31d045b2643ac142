"""Series to volume: order, check and decode the images of one series into a 3D array.

Geometry comes from the headers only (PS3.3 C.7.6.2.1.1): slices are ordered by the
projection of ImagePositionPatient on the slice normal (row cosine x column cosine),
never by InstanceNumber or file name. Enhanced multi-frame CT/MR take the same attributes
from their functional groups (PS3.3 C.7.6.16). What cannot be one volume is refused with a
``VolumeError`` whose message starts ``series <SeriesInstanceUID>: ``.

Gantry tilt is handled, not refused: when the slice positions step along a line that is
not the normal, the affine's third column is that actual step, so every slice of the array
maps exactly onto its source image and ``Volume.sheared`` is True. Positions that do not
lie on one line (uneven tilt, table motion) are refused.

Conventions: ``z`` in messages is the position along the slice normal, in mm; ``array``
is indexed ``[k, r, c]`` (slice, row, column).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from node.errors import VolumeError

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

_ORIENTATION_TOLERANCE = 1e-4  # largest difference between direction cosines of one volume
_PIXEL_SPACING_TOLERANCE = 1e-4  # mm
_SAME_POSITION_MM = 0.01  # closer than this along the normal: the same plane
_DEFER_BYTES = 4096  # elements longer than this (pixel data) are read when first used
_SHEAR_PIXELS = 0.01  # in-plane drift over the stack, in pixels, that counts as sheared
# functional group macros read per frame (PS3.3 C.7.6.16.2), in the order _frame unpacks them
_GROUPS = ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
           "PixelValueTransformationSequence")


@dataclass(frozen=True, eq=False)
class Volume:
    """One series as a 3D array with its geometry; the arrays are read-only.

    ``affine`` maps ``(i, j, k, 1)`` to LPS patient coordinates in mm, where ``i`` is the
    column index (``c``), ``j`` the row index (``r``) and ``k`` the slice index, so voxel
    ``array[k, r, c]`` has its centre at ``affine @ (c, r, k, 1)``:

    - column 0: row direction cosine (ImageOrientationPatient[0:3]) x PixelSpacing[1];
    - column 1: column direction cosine (ImageOrientationPatient[3:6]) x PixelSpacing[0];
    - column 2: the step from slice ``k`` to ``k + 1``: the normal x ``spacing[0]``, or
      the actual step between positions when ``sheared`` (gantry tilt);
    - column 3: ImagePositionPatient of slice 0.

    ``spacing`` is (distance between adjacent slice planes along the normal, PixelSpacing[0]
    = row spacing, PixelSpacing[1] = column spacing), so ``prod(spacing)`` is the voxel
    volume also when sheared. A single slice takes ``spacing[0]`` from SliceThickness, else
    SpacingBetweenSlices, else 1 mm. ``orientation`` holds the six cosines, normalised.
    ``sop_instance_uids`` and ``frame_numbers`` (1-based, all 1 for single-frame images)
    name the source of each slice ``k``.
    """

    array: npt.NDArray[np.float32]
    affine: FloatArray
    spacing: tuple[float, float, float]
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    frame_numbers: tuple[int, ...]
    modality: str
    orientation: tuple[float, ...]
    sheared: bool = False

    def __post_init__(self) -> None:
        slices = self.array.shape[0] if self.array.ndim == 3 else -1
        if (slices < 1 or self.affine.shape != (4, 4) or len(self.orientation) != 6
                or len(self.sop_instance_uids) != slices or len(self.frame_numbers) != slices):
            raise VolumeError(f"series {self.series_instance_uid}: inconsistent Volume: array "
                              f"{self.array.shape}, affine {self.affine.shape}, "
                              f"{len(self.sop_instance_uids)} SOP Instance UIDs, "
                              f"{len(self.frame_numbers)} frame numbers")


@dataclass(frozen=True, eq=False)
class _Frame:
    """One 2D image of the series, from its header; pixels are decoded after the checks."""

    source: int  # index of the data set it comes from
    frame: int  # 0-based frame within that data set
    label: str  # names the file or instance in messages
    sop_instance_uid: str
    position: FloatArray
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slope: float
    intercept: float
    thickness: float | None
    spacing_between: float | None


def load_volume(paths: Sequence[Path], *, spacing_tolerance: float = 0.05,
                series_instance_uid: str | None = None) -> Volume:
    """Read the files of one series into a :class:`Volume`.

    With ``series_instance_uid`` files of other series are skipped; without it the files
    must all belong to one series.
    """
    return load_series(paths, spacing_tolerance=spacing_tolerance,
                       series_instance_uid=series_instance_uid)[0]


def load_series(paths: Sequence[Path], *, spacing_tolerance: float = 0.05,
                series_instance_uid: str | None = None) -> tuple[Volume, list[Dataset]]:
    """:func:`load_volume`, plus the data sets of the series with their pixel data
    dropped once decoded: the headers that results reference, without reading the files
    a second time."""
    uid = series_instance_uid or "(unknown)"
    datasets: list[Dataset] = []
    labels: list[str] = []
    _read_ahead(paths)
    for path in paths:
        try:   # pixel data is read when a slice is decoded, then let go (see _pixels)
            ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
        except Exception as exc:  # readers raise many types; translated, not swallowed
            raise VolumeError(f"series {uid}: cannot read {path}: {exc}") from exc
        if series_instance_uid is None or ds.get("SeriesInstanceUID") == series_instance_uid:
            datasets.append(ds)
            labels.append(str(path))
    if not datasets:
        where = f" among {len(paths)} file(s)" if paths else ": no files given"
        raise VolumeError(f"series {uid}: no instances of the series{where}")
    return _assemble(datasets, labels, spacing_tolerance, owned=True), datasets


def _read_ahead(paths: Sequence[Path]) -> None:
    """Ask the kernel to start reading every file now. The receiver writes with O_DIRECT
    (node/spool.py), so a new study is on disk, not in memory; read one by one, each file
    would wait for the disk twice (header, then pixel data). Advice only: a file that
    cannot be opened here is reported by the read that follows."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def volume_from_datasets(datasets: Sequence[Dataset], *,
                         spacing_tolerance: float = 0.05) -> Volume:
    """Build a :class:`Volume` from the data sets of one series (see the module docstring)."""
    if not datasets:
        raise VolumeError("series (unknown): no instances given")
    labels = [ds.filename if isinstance(getattr(ds, "filename", None), str)
              else f"instance {ds.get('SOPInstanceUID', '(no SOP Instance UID)')}"
              for ds in datasets]
    return _assemble(list(datasets), labels, spacing_tolerance, owned=False)


def _assemble(datasets: list[Dataset], labels: Sequence[str], tolerance: float, *,
              owned: bool) -> Volume:
    """``owned``: the data sets were read here and may be dropped once decoded."""
    uid = str(datasets[0].get("SeriesInstanceUID", "(no SeriesInstanceUID)"))
    if not (math.isfinite(tolerance) and 0 <= tolerance < 1):
        raise ValueError(f"spacing_tolerance: expected a fraction in [0, 1), got {tolerance}")
    others = sorted({str(ds.get("SeriesInstanceUID")) for ds in datasets} - {uid})
    if others:
        raise VolumeError(f"series {uid}: the instances also belong to {len(others)} other "
                          f"series ({', '.join(others[:3])}); pass one series")
    frames = _dedupe(uid, [f for i, (ds, label) in enumerate(zip(datasets, labels))
                           for f in _frames(uid, ds, i, label)])
    _check_uniform(uid, frames)
    row, col = (np.array(frames[0].orientation[:3]), np.array(frames[0].orientation[3:]))
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    frames = sorted(frames, key=lambda f: float(f.position @ normal))
    z = np.array([float(f.position @ normal) for f in frames])
    _check_positions(uid, frames, z)
    _check_gaps(uid, z, tolerance)
    step, slice_spacing, sheared = _slice_step(uid, frames, normal, z, tolerance)
    dr, dc = frames[0].pixel_spacing
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = row * dc, col * dr, step
    affine[:3, 3] = frames[0].position
    affine.flags.writeable = False
    modality = str(datasets[0].get("Modality", ""))
    array = _pixels(uid, datasets, frames, owned=owned)
    log.debug("series %s: volume %s, spacing %.3g/%.3g/%.3g mm%s", uid, array.shape,
              slice_spacing, dr, dc, ", sheared" if sheared else "")
    return Volume(array, affine, (slice_spacing, dr, dc), uid,
                  tuple(f.sop_instance_uid for f in frames), tuple(f.frame + 1 for f in frames),
                  modality, (*map(float, row), *map(float, col)),
                  sheared)


def _numbers(uid: str, label: str, name: str, value: Any, count: int) -> tuple[float, ...]:
    """``count`` finite numbers from a DS value, or an error naming the attribute."""
    if value is None or value == "":
        raise VolumeError(f"series {uid}: {name} is missing in {label}")
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) \
        else [value]
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise VolumeError(f"series {uid}: {name} in {label}: expected {count} number(s), "
                          f"got {value!r}")
    return numbers


def _optional(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _group_item(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """The first item of a functional group macro, per-frame before shared (PS3.3 C.7.6.16)."""
    groups = [ds.PerFrameFunctionalGroupsSequence[index]]
    groups += list(ds.get("SharedFunctionalGroupsSequence") or [])
    for group in groups:
        seq = group.get(keyword)
        if seq:
            item: Dataset = seq[0]
            return item
    return None


def _attr(item: Dataset | None, keyword: str) -> Any:
    return None if item is None else item.get(keyword)


def _frames(uid: str, ds: Dataset, source: int, label: str) -> list[_Frame]:
    """The frames of one data set, classic single-frame or enhanced multi-frame."""
    if ds.get("SamplesPerPixel", 1) != 1:
        raise VolumeError(f"series {uid}: {label} has SamplesPerPixel {ds.SamplesPerPixel}; "
                          f"a volume needs grey-scale images (1 sample per pixel)")
    if "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
        raise VolumeError(f"series {uid}: {label} uses a Modality LUT Sequence; only "
                          f"RescaleSlope/RescaleIntercept are supported")
    if int(ds.get("Rows") or 0) < 1 or int(ds.get("Columns") or 0) < 1:
        raise VolumeError(f"series {uid}: Rows/Columns missing or zero in {label}")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if count != 1:
            raise VolumeError(f"series {uid}: {label} has {count} frames but no Per-frame "
                              f"Functional Groups Sequence to place them")
        return [_frame(uid, ds, source, 0, label, {group: ds for group in _GROUPS})]
    if count != len(ds.PerFrameFunctionalGroupsSequence):
        raise VolumeError(f"series {uid}: {label} has NumberOfFrames {count} but "
                          f"{len(ds.PerFrameFunctionalGroupsSequence)} per-frame functional "
                          f"group items")
    return [_frame(uid, ds, source, i, f"{label} frame {i + 1}",
                   {group: _group_item(ds, i, group) for group in _GROUPS})
            for i in range(count)]


def _frame(uid: str, ds: Dataset, source: int, index: int, where: str,
           items: dict[str, Dataset | None]) -> _Frame:
    """One frame from ``items``: the data set itself, or its functional group macros."""
    def get(group: str, keyword: str, count: int, default: Any = None) -> tuple[float, ...]:
        value = _attr(items[group], keyword)
        name = keyword if items[group] is ds else f"{group} {keyword}"
        return _numbers(uid, where, name, default if value is None else value, count)

    plane, orient, measures, rescale = _GROUPS
    position = get(plane, "ImagePositionPatient", 3)
    orientation = get(orient, "ImageOrientationPatient", 6)
    dr, dc = get(measures, "PixelSpacing", 2)
    if dr <= 0 or dc <= 0:
        raise VolumeError(f"series {uid}: PixelSpacing in {where}: expected positive values, "
                          f"got {[dr, dc]}")
    (slope,) = get(rescale, "RescaleSlope", 1, ds.get("RescaleSlope", 1))
    (intercept,) = get(rescale, "RescaleIntercept", 1, ds.get("RescaleIntercept", 0))
    return _Frame(source, index, where, str(ds.get("SOPInstanceUID", "")), np.array(position),
                  orientation, (dr, dc), int(ds.Rows), int(ds.Columns), slope, intercept,
                  _optional(_attr(items[measures], "SliceThickness")),
                  _optional(_attr(items[measures], "SpacingBetweenSlices")))


def _dedupe(uid: str, frames: list[_Frame]) -> list[_Frame]:
    """Drop repeated copies of one SOP instance frame; refuse copies that disagree."""
    seen: dict[tuple[str, int], _Frame] = {}
    for f in frames:
        first = seen.setdefault((f.sop_instance_uid, f.frame), f)
        if first is not f:
            if not np.allclose(first.position, f.position, atol=_SAME_POSITION_MM, rtol=0):
                raise VolumeError(f"series {uid}: SOP Instance UID {f.sop_instance_uid} "
                                  f"appears twice with different positions ({first.label} "
                                  f"and {f.label})")
            log.debug("series %s: ignoring a repeated copy of %s", uid, f.label)
    return list(seen.values())


def _check_uniform(uid: str, frames: list[_Frame]) -> None:
    """One orientation, one matrix size and one pixel spacing for all frames."""
    first = frames[0]
    for f in frames[1:]:
        if max(abs(a - b) for a, b in zip(first.orientation, f.orientation)) > \
                _ORIENTATION_TOLERANCE:
            raise VolumeError(
                f"series {uid}: mixed orientations: ImageOrientationPatient "
                f"{_fmt(first.orientation)} in {first.label} and {_fmt(f.orientation)} in "
                f"{f.label}; one volume needs one orientation")
        if (f.rows, f.columns) != (first.rows, first.columns):
            raise VolumeError(f"series {uid}: mixed matrix sizes: {first.rows}x{first.columns} "
                              f"(Rows x Columns) in {first.label} and {f.rows}x{f.columns} in "
                              f"{f.label}")
        if max(abs(a - b) for a, b in zip(first.pixel_spacing, f.pixel_spacing)) > \
                _PIXEL_SPACING_TOLERANCE:
            raise VolumeError(f"series {uid}: mixed PixelSpacing: {_fmt(first.pixel_spacing)} "
                              f"mm in {first.label} and {_fmt(f.pixel_spacing)} mm in {f.label}")
    row, col = np.array(first.orientation[:3]), np.array(first.orientation[3:])
    norms = np.linalg.norm(row), np.linalg.norm(col)
    if min(norms) < 0.99 or max(norms) > 1.01 or abs(row @ col) > 1e-3 * float(np.prod(norms)):
        raise VolumeError(f"series {uid}: ImageOrientationPatient {_fmt(first.orientation)} in "
                          f"{first.label} is not two orthogonal unit vectors")


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def _check_positions(uid: str, frames: list[_Frame], z: FloatArray) -> None:
    """Refuse two or more images in one plane (echoes, phases, repeats in one series)."""
    same = np.flatnonzero(np.diff(z) < _SAME_POSITION_MM)
    if same.size:
        i = int(same[0])
        group = [f for f, zz in zip(frames, z) if abs(zz - z[i]) < _SAME_POSITION_MM]
        names = ", ".join(f.label for f in group[:4]) + (", ..." if len(group) > 4 else "")
        raise VolumeError(f"series {uid}: {len(group)} slices share position z={z[i]:.2f} mm "
                          f"along the slice normal ({names}); several echoes, phases or "
                          f"acquisitions in one series cannot be one volume")


def _check_gaps(uid: str, z: FloatArray, tolerance: float) -> None:
    """Every gap within ``tolerance`` (relative) of the median gap; name missing slices."""
    gaps = np.diff(z)
    if gaps.size < 2:
        return
    median = float(np.median(gaps))
    bad = [int(i) for i in np.flatnonzero(np.abs(gaps - median) > tolerance * median)]
    if not bad:
        return
    missing = []
    for i in bad:
        ratio = float(gaps[i]) / median
        m = round(ratio)
        if m >= 2 and abs(ratio - m) <= tolerance * m:
            missing.append(f"between z={z[i]:.2f} and z={z[i + 1]:.2f} mm (gap {gaps[i]:.3g} "
                           f"mm, about {m - 1} slice(s))")
    if missing:
        more = f" and {len(missing) - 3} more gap(s)" if len(missing) > 3 else ""
        raise VolumeError(f"series {uid}: missing slice(s) " + "; ".join(missing[:3]) + more
                          + f" at the median spacing of {median:.3g} mm along the slice normal")
    i = max(bad, key=lambda j: abs(float(gaps[j]) - median))
    raise VolumeError(f"series {uid}: irregular spacing: {len(bad)} of {gaps.size} gaps differ "
                      f"from the median {median:.3g} mm by more than {tolerance:.0%}, e.g. "
                      f"{gaps[i]:.3g} mm between z={z[i]:.2f} and z={z[i + 1]:.2f} mm")


def _slice_step(uid: str, frames: list[_Frame], normal: FloatArray, z: FloatArray,
                tolerance: float) -> tuple[FloatArray, float, bool]:
    """The affine's third column, the plane spacing, and whether the volume is sheared."""
    n = len(frames)
    if n == 1:
        f = frames[0]
        spacing = f.thickness or f.spacing_between or 1.0
        log.debug("series %s: single slice, slice spacing %.3g mm taken from %s", uid, spacing,
                  "SliceThickness" if f.thickness else
                  "SpacingBetweenSlices" if f.spacing_between else "the default 1 mm")
        return normal * spacing, spacing, False
    positions = np.stack([f.position for f in frames])
    step = (positions[-1] - positions[0]) / (n - 1)
    spacing = float(z[-1] - z[0]) / (n - 1)
    resid = positions - (positions[0] + np.arange(n)[:, None] * step)
    off = np.linalg.norm(resid - np.outer(resid @ normal, normal), axis=1)
    worst = int(np.argmax(off))
    if off[worst] > tolerance * spacing:
        raise VolumeError(f"series {uid}: slice positions do not lie on one line (uneven gantry "
                          f"tilt or table motion): the slice at z={z[worst]:.2f} mm is "
                          f"{off[worst]:.3g} mm off the line through the first and last slice")
    drift = float(np.linalg.norm((step - (step @ normal) * normal) * (n - 1)))
    if drift <= _SHEAR_PIXELS * min(frames[0].pixel_spacing):
        return normal * spacing, spacing, False
    tilt = math.degrees(math.atan2(drift / (n - 1), spacing))
    log.info("series %s: slice positions step %.2f degrees off the normal (gantry tilt); "
             "volume kept with a sheared affine", uid, tilt)
    return step, spacing, True


def _decoded(uid: str, ds: Dataset, label: str) -> npt.NDArray[Any]:
    """All frames of one data set as (frames, rows, columns), or an error naming the syntax."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise many types; translated, not swallowed
        name = f"{syntax.name} ({syntax})" if syntax else "no transfer syntax in the file meta"
        raise VolumeError(f"series {uid}: cannot decode the pixel data of {label} (SOP Instance "
                          f"UID {ds.get('SOPInstanceUID')}, transfer syntax {name}): "
                          f"{exc}") from exc
    return pixels.reshape((-1, *pixels.shape[-2:]))


def _pixels(uid: str, datasets: list[Dataset], frames: list[_Frame], *,
            owned: bool) -> npt.NDArray[np.float32]:
    """The sorted frames, decoded and rescaled slice by slice (PS3.3 C.11.1.1.2) into the
    one float32 array. A data set's decoded pixels are dropped after its last frame, and,
    when ``owned``, the data set's pixel data too (the header stays, for the results), so
    memory holds the volume and one decoded data set, not the whole series twice."""
    cache: dict[int, npt.NDArray[Any]] = {}
    last = {f.source: k for k, f in enumerate(frames)}
    out = np.empty((len(frames), frames[0].rows, frames[0].columns), dtype=np.float32)
    # one float64 slice reused for the arithmetic: a fresh temporary per step and slice
    # (three of 2 MiB for 512x512) cost more than the arithmetic; same values as before
    rescaled = np.empty(out.shape[1:], dtype=np.float64)
    for k, f in enumerate(frames):
        if f.source not in cache:
            cache[f.source] = _decoded(uid, datasets[f.source], f.label)
        stack = cache[f.source]
        if stack.shape[1:] != out.shape[1:] or f.frame >= stack.shape[0]:
            raise VolumeError(f"series {uid}: {f.label} decodes to {stack.shape}, expected "
                              f"frame {f.frame + 1} of {f.rows}x{f.columns} pixels")
        rescaled[...] = stack[f.frame]
        rescaled *= f.slope
        rescaled += f.intercept
        out[k] = rescaled
        if last[f.source] == k:
            del cache[f.source]
            if owned and "PixelData" in datasets[f.source]:
                del datasets[f.source].PixelData  # also drops pydicom's cached pixel_array
    out.flags.writeable = False
    return out
