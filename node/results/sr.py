"""Measurements of a prediction as a TID 1500 Measurement Report in a Comprehensive 3D SR.

The observer is a DEVICE (TID 1004) that names the model: device name "<model> <version>",
manufacturer, model name, and the weights' SHA-256 as serial number. Each label spec gets
one measurement group, in increasing label value:

- a label with voxels: a volumetric ROI group (TID 1411) referencing its SEG segment, with
  volume (mm3), number of lesions (3D connected components, 26-connectivity) and the mean,
  minimum and maximum intensity in the source's units (CT: attenuation coefficient in HU;
  MR: signal intensity without unit; other modalities: no intensity measurements);
- a label without voxels: a generic group (TID 1501) with volume 0 and 0 lesions, so an
  empty prediction still gives a valid report saying that nothing was found.

A classification model adds one TID 1501 group per declared class after those (coded
finding, probability, presence; see ``classify.py``); a classification-only model has no
label specs, no SEG, and an SR of those groups alone.

The series description carries the disclaimer; a ``predecessor`` (an earlier SR of the
same job) is referenced in PredecessorDocumentsSequence (PS3.3 C.17.2.3).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.errors import ResultError
from node.results.classify import ClassLike, classification_groups
from node.results.seg import (
    LabelLike,
    check_text,
    coded,
    dicom_datetime,
    occupied_slices,
    order_source,
    pin_times,
    present_specs,
    segment_numbers,
)
from node.results.uids import ResultUids, tracking_uid

log = logging.getLogger(__name__)

_SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # PS3.4 Annex B.5, SR Storage classes
_LESIONS_UNIT = hd.sr.CodedConcept("{lesions}", "UCUM", "lesions")
# modality -> (concept name, unit) of intensity measurements (CID 7180 / CID 7181)
_INTENSITY = {
    "CT": (codes.DCM.AttenuationCoefficient, codes.UCUM.HounsfieldUnit),
    "MR": (codes.DCM.MRSignalIntensity, codes.UCUM.NoUnits),
}
_STATISTICS = ((codes.SCT.Mean, np.mean), (codes.SCT.Minimum, np.min),
               (codes.SCT.Maximum, np.max))


# the 13 "forward" steps of the 26-neighbourhood: each neighbour pair is found once
_FORWARD = [step for step in itertools.product((-1, 0, 1), repeat=3) if step > (0, 0, 0)]


def count_components(mask: npt.NDArray[np.bool_]) -> int:
    """Number of 26-connected components of ``mask`` (3D).

    Works on the foreground voxels only, so the cost follows their number, not the size
    of their bounding box (a model's scattered false positives can span the volume):
    neighbour pairs are found by looking each voxel's 13 forward neighbours up in the
    sorted voxel indices, then union-find with vectorised hooking (every root points at
    the smallest root it touches) and pointer jumping, until no pair joins two roots.
    """
    if mask.ndim != 3:
        raise ValueError(f"count_components: expected a 3D mask, got shape {mask.shape}")
    box = bounding_box(mask)
    if box is None:
        return 0
    fg = np.pad(mask[box], 1)          # a margin of one voxel: no step wraps to another row
    rows, columns = fg.shape[1:]
    voxels = np.flatnonzero(fg)
    a, b = _neighbour_pairs(voxels, fg.size,
                            [(dk * rows + dr) * columns + dc for dk, dr, dc in _FORWARD])
    parent = np.arange(voxels.size)
    while True:
        ra, rb = parent[a], parent[b]      # roots: parent is fully jumped here
        apart = np.flatnonzero(ra != rb)   # pairs joined once stay joined: drop them
        if not apart.size:
            return int(np.count_nonzero(parent == np.arange(voxels.size)))
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        low = np.minimum(ra, rb)
        np.minimum.at(parent, ra, low)
        np.minimum.at(parent, rb, low)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


def _neighbour_pairs(voxels: npt.NDArray[np.intp], size: int, steps: Sequence[int],
                     ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Positions (i, j) in ``voxels`` (sorted flat indices into ``size`` voxels) of every
    pair with ``voxels[j] - voxels[i]`` in ``steps``. A dense mask looks neighbours up in
    a grid of positions; a sparse one by binary search, without the grid's memory."""
    first, second = [], []
    if voxels.size * 32 >= size:
        grid = np.full(size, -1, dtype=np.intp)
        grid[voxels] = np.arange(voxels.size)
        for step in steps:
            at = grid[voxels + step]
            hit = np.flatnonzero(at >= 0)
            first.append(hit)
            second.append(at[hit])
    else:
        for step in steps:
            target = voxels + step
            at = np.minimum(np.searchsorted(voxels, target), voxels.size - 1)
            hit = np.flatnonzero(voxels[at] == target)
            first.append(hit)
            second.append(at[hit])
    return np.concatenate(first), np.concatenate(second)


def bounding_box(mask: npt.NDArray[np.bool_]) -> tuple[slice, slice, slice] | None:
    """The smallest box holding every True voxel of a 3D mask; None when there is none."""
    spans = []
    for axis in range(3):
        held = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if not held.size:
            return None
        spans.append(slice(int(held[0]), int(held[-1]) + 1))
    return spans[0], spans[1], spans[2]


def _label_box(labels: npt.NDArray[np.integer], volume_array: npt.NDArray[np.floating],
               value: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.floating]]:
    """The mask of one label value and the values under it, both cropped to the mask's
    bounding box: the measurements then never pass over the whole volume."""
    held = np.flatnonzero(occupied_slices(labels))
    if held.size:
        first, last = int(held[0]), int(held[-1]) + 1
        mask = labels[first:last] == value
        box = bounding_box(mask)
        if box is not None:
            return mask[box], volume_array[first:last][box]
    return np.zeros((0, 0, 0), dtype=np.bool_), volume_array[:0, :0, :0]


def _measurement(name: hd.sr.CodedConcept | Code, value: float,
                 unit: hd.sr.CodedConcept | Code,
                 derivation: Code | None = None) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=value, unit=unit, derivation=derivation)


def _measurements(mask: npt.NDArray[np.bool_], values: npt.NDArray[np.floating],
                  voxel_mm3: float, modality: str) -> list[hd.sr.Measurement]:
    voxels = int(np.count_nonzero(mask))
    found = [
        _measurement(codes.SCT.Volume, round(voxels * voxel_mm3, 3), codes.UCUM.CubicMillimeter),
        _measurement(codes.SCT.NumberOfLesions, count_components(mask), _LESIONS_UNIT),
    ]
    if voxels and modality in _INTENSITY:
        name, unit = _INTENSITY[modality]
        inside = values[mask].astype(np.float64)
        found += [_measurement(name, round(float(stat(inside)), 2), unit, derivation)
                  for derivation, stat in _STATISTICS]
    return found


_Group = (hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
         | hd.sr.MeasurementsAndQualitativeEvaluations)


def _groups(seg: hd.seg.Segmentation | None, specs: Sequence[LabelLike],
            voxels: dict[int, int], labels: npt.NDArray[np.integer],
            volume_array: npt.NDArray[np.floating], voxel_mm3: float, source_series: str, *,
            modality: str, model: str, version: str,
            algorithm: hd.sr.AlgorithmIdentification, job_key: str) -> list[_Group]:
    """One measurement group per label spec: TID 1411 referencing the segment when the
    label has voxels, else TID 1501 with volume 0."""
    numbers = segment_numbers(seg)
    groups: list[_Group] = []
    for spec in specs:
        value = int(spec.value)
        tracking_id = tracking_uid(job_key, model, version, value)
        common: dict[str, Any] = dict(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_id, identifier=spec.name),
            finding_type=coded(spec.type, f"label {value} type"),
            finding_category=coded(spec.category, f"label {value} category"),
            algorithm_id=algorithm,
            measurements=_measurements(*_label_box(labels, volume_array, value), voxel_mm3,
                                       modality))
        if voxels[value] == 0:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**common))
            continue
        number = numbers.get(tracking_id)
        if seg is None or number is None:
            raise ResultError(f"seg: no segment with the TrackingUID of label {value} "
                              f"({spec.name}); was the SEG built for job {job_key}, model "
                              f"{model} {version}?")
        segment = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(source_series))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=segment, **common))
    return groups


def _check_inputs(labels: npt.NDArray[np.generic], volume_array: npt.NDArray[np.generic],
                  spacing: tuple[float, float, float]) -> float:
    if volume_array.shape != labels.shape:
        raise ResultError(f"volume_array: expected the shape of labels {labels.shape}, got "
                          f"{volume_array.shape}")
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ResultError(f"spacing: expected 3 positive finite numbers (mm), got {spacing!r}")
    return float(np.prod(spacing))


def _slice_shape(source: Sequence[Dataset]) -> npt.NDArray[np.uint8]:
    """A read-only stand-in for labels (one zero slice per source image) that lets a
    classification-only report check and order its source like a segmentation does."""
    first = source[0] if source else None
    if first is None:
        raise ResultError("source: expected the source images, got none")
    shape = (len(source), int(first.get("Rows", 1)), int(first.get("Columns", 1)))
    return np.broadcast_to(np.zeros((), dtype=np.uint8), shape)


def _check_seg(seg: hd.seg.Segmentation | None, series_uid: str, needed: bool) -> None:
    if seg is None:
        if needed:
            raise ResultError("seg: labels contain voxels but no SEG was given; pass the "
                              "Segmentation that build_seg returned")
        return
    referenced = {str(item.SeriesInstanceUID)
                  for item in seg.get("ReferencedSeriesSequence") or []}
    if referenced != {series_uid}:
        raise ResultError(f"seg: it references series {sorted(referenced)}, but the source "
                          f"images are series {series_uid}")


def _check_predecessor(predecessor: Dataset, sr_instance: str, study_uid: str) -> None:
    sop_class = str(predecessor.get("SOPClassUID", ""))
    if not sop_class.startswith(_SR_CLASS_PREFIX):
        raise ResultError(f"predecessor: expected an SR document, got SOP Class "
                          f"{sop_class or '(none)'}")
    if str(predecessor.get("StudyInstanceUID")) != study_uid:
        raise ResultError(f"predecessor: belongs to study {predecessor.get('StudyInstanceUID')}"
                          f", expected the source's study {study_uid}")
    if str(predecessor.get("SOPInstanceUID")) == sr_instance:
        raise ResultError(f"predecessor: SOP Instance UID {sr_instance} is the UID of the SR "
                          f"being written; a superseding run needs a new job key or version")


def build_sr(seg: hd.seg.Segmentation | None, source: Sequence[Dataset],
             labels: npt.NDArray[np.integer] | None,
             volume_array: npt.NDArray[np.floating] | None,
             spacing: tuple[float, float, float] | None, label_specs: Sequence[LabelLike], *,
             model: str, version: str, weights_sha256: str, job_key: str,
             classes: Sequence[ClassLike] = (),
             class_probabilities: Sequence[float] | None = None,
             series_number: int = 902, series_description: str = "pacsnode AI report",
             disclaimer: str = "AI result, not a diagnosis", manufacturer: str = "pacsnode",
             predecessor: Dataset | None = None, sop_instance_uids: Sequence[str] | None = None,
             content_datetime: datetime | None = None,
             voxel_counts: Mapping[int, int] | None = None) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report of ``labels`` measured on ``volume_array`` (rescaled values).

    ``labels``, ``volume_array`` and ``source`` share the slice order (see
    :func:`node.results.seg.order_source`); ``spacing`` is ``Volume.spacing`` (slice, row,
    column, mm). ``seg`` is what :func:`~node.results.seg.build_seg` returned for the same
    arguments (None for an empty prediction). ``voxel_counts``: see
    :func:`~node.results.seg.present_specs`.
    """
    segmenting = bool(label_specs)
    if not segmenting and not classes:
        raise ResultError("label_specs and classes: expected labels to measure, classes to "
                          "report, or both; got neither")
    if segmenting and (labels is None or volume_array is None or spacing is None):
        raise ResultError("labels, volume_array and spacing: required when label_specs "
                          "are given (a segmentation model)")
    datasets = order_source(source, labels if labels is not None and segmenting
                            else _slice_shape(source), sop_instance_uids)
    for name, text in (("model", model), ("version", version),
                       ("weights_sha256", weights_sha256), ("manufacturer", manufacturer)):
        check_text(name, text)
    description = check_text("series_description with disclaimer",
                             f"{series_description} ({disclaimer})")
    source_series = str(datasets[0].SeriesInstanceUID)
    uids = ResultUids.for_job(job_key, model, version)
    if predecessor is not None:
        _check_predecessor(predecessor, uids.sr_instance, str(datasets[0].StudyInstanceUID))
    algorithm = hd.sr.AlgorithmIdentification(name=model, version=version,
                                              parameters=[f"weights_sha256={weights_sha256}"])
    groups: list[_Group] = []
    if segmenting:
        assert labels is not None and volume_array is not None and spacing is not None
        voxel_mm3 = _check_inputs(labels, volume_array, spacing)
        specs, voxels = present_specs(labels, label_specs, voxel_counts)
        _check_seg(seg, source_series, any(voxels.values()))
        groups += _groups(seg, specs, voxels, labels, volume_array, voxel_mm3, source_series,
                          modality=str(datasets[0].get("Modality", "")), model=model,
                          version=version, algorithm=algorithm, job_key=job_key)
    elif seg is not None:
        raise ResultError("seg: given, but the model declares no labels (classification only)")
    groups += classification_groups(classes, class_probabilities, algorithm=algorithm,
                                    job_key=job_key, model=model, version=version)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device_observer, name=f"{model} {version}",
            manufacturer_name=manufacturer, model_name=model, serial_number=weights_sha256))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=groups)
    date, time = dicom_datetime(content_datetime)
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=[*([seg] if seg is not None else []), *datasets], content=report[0],
            series_instance_uid=uids.sr_series, series_number=series_number,
            sop_instance_uid=uids.sr_instance, instance_number=1, manufacturer=manufacturer,
            is_complete=True, is_final=False, is_verified=False,
            previous_versions=None if predecessor is None else [predecessor],
            series_description=description, manufacturer_model_name=model,
            software_versions=version, device_serial_number=weights_sha256,
            content_date=date, content_time=time, series_date=date, series_time=time)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultError(f"job {job_key}: cannot build the SR: {exc}") from exc
    pin_times(sr, date, time)
    return sr
