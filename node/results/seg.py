"""A model's label map as a binary DICOM Segmentation (PS3.3 A.51), written with highdicom.

One segment per label that the prediction contains, numbered 1, 2, ... in increasing label
value; labels without a single voxel get no segment (a segment without frames confuses
viewers) and an empty prediction gives no SEG at all (``build_seg`` returns None; the SR
still reports the absence). Empty frames are omitted. Patient and study come from the
source images, the series is new, and its UIDs are derived from the job (``uids.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.errors import ResultError
from node.results.uids import ResultUids, derive_uid, tracking_uid

log = logging.getLogger(__name__)

_MAX_LO = 64  # PS3.5 6.2, Long String
_COUNT_VOXELS = 1 << 22   # voxels counted at a time by label_counts (32 MiB as intp)
_CONTENT_LABEL = "PACSNODE_AI"  # CS, at most 16 characters
_SAME_PLANE_MM = 1e-3


class LabelLike(Protocol):
    """What results need of ``node.inference.runner.LabelSpec`` (kept structural, so this
    package never imports the inference stack and its torch)."""

    @property
    def value(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def category(self) -> tuple[str, str, str]: ...

    @property
    def type(self) -> tuple[str, str, str]: ...


def coded(code: tuple[str, str, str], where: str) -> hd.sr.CodedConcept:
    """(code value, scheme designator, meaning) as a highdicom CodedConcept."""
    try:
        value, scheme, meaning = code
    except (TypeError, ValueError):
        raise ResultError(f"{where}: expected (code value, scheme, meaning), got {code!r}") \
            from None
    if not (value and scheme and meaning):
        raise ResultError(f"{where}: expected non-empty code value, scheme and meaning, got "
                          f"{code!r}")
    return hd.sr.CodedConcept(value=str(value), scheme_designator=str(scheme),
                              meaning=str(meaning))


def check_text(name: str, text: str, limit: int = _MAX_LO) -> str:
    if not text or len(text) > limit or "\\" in text:
        raise ResultError(f"{name}: expected 1-{limit} characters without a backslash, got "
                          f"{text!r} ({len(text)} characters)")
    return text


def label_counts(labels: npt.NDArray[np.integer]) -> dict[int, int]:
    """{label value: voxel count} for the values present.

    A model's label map is mostly background: the slices holding any label are found
    with one ``max`` per slice (a vectorised pass, no copy), and only those are counted,
    a few slices at a time (``np.bincount`` casts what it counts to intp, 8 bytes a
    voxel: over a whole 1,000-slice 512x512 map that would be a 2 GiB temporary; np.unique
    sorts, which costs seconds on a 300-slice 512x512 volume)."""
    if labels.size and labels.dtype.kind in "ub" and labels.dtype.itemsize <= 2:
        held = labels[occupied_slices(labels)] if labels.ndim > 1 else labels
        counts = np.zeros(1 << (8 * labels.dtype.itemsize), dtype=np.int64)
        step = max(1, _COUNT_VOXELS // max(1, int(np.prod(held.shape[1:]))))
        for start in range(0, len(held), step):
            flat = held[start:start + step].ravel()
            part = np.bincount(flat.view(np.uint8) if labels.dtype.kind == "b" else flat)
            counts[:len(part)] += part
        counts[0] += labels.size - held.size
        return {int(v): int(counts[v]) for v in np.flatnonzero(counts)}
    found, numbers = np.unique(labels.ravel(), return_counts=True)
    return {int(v): int(n) for v, n in zip(found, numbers, strict=True)}


def occupied_slices(labels: npt.NDArray[np.generic]) -> npt.NDArray[np.bool_]:
    """Along the first axis: which slices hold a non-zero value (``max`` per slice, which
    numpy vectorises; ``any`` and ``nonzero`` are several times slower)."""
    if labels.shape[0] == 0 or labels.size == 0:
        return np.zeros(labels.shape[0], dtype=np.bool_)
    flat = labels.reshape(labels.shape[0], -1)
    if labels.dtype.kind == "b":
        flat = flat.view(np.uint8)
    if flat.dtype.kind != "u":        # signed or float: a maximum of 0 can hide negatives
        return np.asarray(flat.any(axis=1))
    return np.asarray(flat.max(axis=1) != 0)


def present_specs(labels: npt.NDArray[np.integer], label_specs: Sequence[LabelLike],
                  voxel_counts: Mapping[int, int] | None = None,
                  ) -> tuple[list[LabelLike], dict[int, int]]:
    """Label specs sorted by value, and {label value: voxel count} for every spec.

    Every non-zero value in ``labels`` must have a spec; values must be unique and > 0.
    ``voxel_counts``: :func:`label_counts` of ``labels`` when the caller has it already
    (a full pass over a 300-slice label map is ~0.1 s; SEG and SR both need it).
    """
    values = [int(s.value) for s in label_specs]
    if not label_specs:
        raise ResultError("label_specs: expected at least one LabelSpec, got none")
    if len(set(values)) != len(values) or min(values) < 1:
        raise ResultError(f"label_specs: expected unique label values > 0, got {values}")
    voxels = dict(voxel_counts) if voxel_counts is not None else label_counts(labels)
    unknown = sorted(v for v in voxels if v != 0 and v not in set(values))
    if unknown:
        raise ResultError(f"labels: values {unknown} have no LabelSpec (known: "
                          f"{sorted(values)}); describe every class the model outputs")
    ordered = sorted(label_specs, key=lambda s: int(s.value))
    return ordered, {int(s.value): voxels.get(int(s.value), 0) for s in ordered}


def order_source(source: Sequence[Dataset], labels: npt.NDArray[np.generic],
                 sop_instance_uids: Sequence[str] | None) -> list[Dataset]:
    """The source images in the order of ``labels``' slice axis, checked.

    With ``sop_instance_uids`` (``Volume.sop_instance_uids``) the data sets are picked by
    UID, whatever order they came in; without it ``source`` must already be in volume
    order: increasing position along the slice normal (PS3.3 C.7.6.2.1.1).
    """
    if labels.ndim != 3:
        raise ResultError(f"labels: expected a 3D array (slices, rows, columns), got shape "
                          f"{labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_:
        raise ResultError(f"labels: expected an integer array, got dtype {labels.dtype}")
    if sop_instance_uids is not None:
        by_uid = {str(ds.get("SOPInstanceUID", "")): ds for ds in source}
        missing = [u for u in sop_instance_uids if u not in by_uid]
        if missing:
            raise ResultError(f"source: {len(missing)} SOP Instance UID(s) of the volume are "
                              f"not among the {len(source)} source data sets, e.g. "
                              f"{missing[0]}")
        source = [by_uid[u] for u in sop_instance_uids]
    datasets = list(source)
    if len(datasets) != labels.shape[0]:
        raise ResultError(f"source: expected one data set per slice of labels "
                          f"({labels.shape[0]}), got {len(datasets)}")
    for ds in datasets:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames != 1 or "PerFrameFunctionalGroupsSequence" in ds:
            raise ResultError(f"source: instance {ds.get('SOPInstanceUID')} is multi-frame "
                              f"({frames} frames); results for multi-frame sources are not "
                              f"supported yet")
        if (int(ds.Rows), int(ds.Columns)) != labels.shape[1:]:
            raise ResultError(f"source: instance {ds.SOPInstanceUID} is {ds.Rows}x{ds.Columns}"
                              f" (Rows x Columns) but labels slices are {labels.shape[1:]}")
    series = {str(ds.get("SeriesInstanceUID")) for ds in datasets}
    if len(series) != 1:
        raise ResultError(f"source: expected the images of one series, got {len(series)} "
                          f"series ({', '.join(sorted(series)[:3])})")
    _check_slice_order(datasets)
    return datasets


def _check_slice_order(datasets: Sequence[Dataset]) -> None:
    try:
        cosines = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    except (AttributeError, TypeError, ValueError) as exc:
        raise ResultError(f"source: ImagePositionPatient/ImageOrientationPatient missing or "
                          f"invalid: {exc}") from exc
    normal = np.cross(cosines[:3], cosines[3:])
    steps = np.diff(positions @ normal)
    if steps.size and not np.all(steps > _SAME_PLANE_MM):
        k = int(np.argmax(steps <= _SAME_PLANE_MM))
        raise ResultError(f"source: slices are not in volume order (increasing position along "
                          f"the slice normal): instance {datasets[k + 1].SOPInstanceUID} does "
                          f"not follow {datasets[k].SOPInstanceUID}; pass sop_instance_uids="
                          f"Volume.sop_instance_uids or the data sets in that order")


def segment_map(labels: npt.NDArray[np.integer],
                values: Sequence[int]) -> npt.NDArray[np.unsignedinteger]:
    """``labels`` with label value ``values[i]`` as segment number ``i + 1``, every other
    value as 0. When the values already are 1..N in an unsigned map (one class labelled
    1, the usual case) that is ``labels`` itself, not a copy; otherwise only the slices
    holding labels are translated, through a lookup table."""
    dtype = np.uint8 if len(values) < 256 else np.uint16
    if (labels.dtype.kind == "u" and labels.dtype.itemsize <= 2
            and list(values) == list(range(1, len(values) + 1))
            and int(labels.max(initial=0)) <= len(values)):
        return labels.astype(dtype, copy=False)
    out = np.zeros(labels.shape, dtype=dtype)
    held = occupied_slices(labels)
    part = labels[held]
    if part.size:
        low = int(part.min())
        table = np.zeros(int(part.max()) - low + 1, dtype=dtype)
        for number, value in enumerate(values, start=1):
            if low <= value < low + table.size:
                table[value - low] = number
        out[held] = table[part.astype(np.intp) - low]
    return out


def dicom_datetime(value: datetime | None) -> tuple[str, str]:
    """(DA, TM) of ``value``, default now."""
    value = datetime.now() if value is None else value
    return value.strftime("%Y%m%d"), value.strftime("%H%M%S.%f")


def pin_times(ds: Dataset, date: str, time: str) -> None:
    """Replace the creation times highdicom takes from the clock, so the same inputs give
    the same bytes."""
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    for item in ds.get("ContributingEquipmentSequence") or []:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + time


def build_seg(source: Sequence[Dataset], labels: npt.NDArray[np.integer],
              label_specs: Sequence[LabelLike], *, model: str, version: str,
              weights_sha256: str, job_key: str, series_number: int = 901,
              series_description: str = "pacsnode AI segmentation",
              manufacturer: str = "pacsnode", sop_instance_uids: Sequence[str] | None = None,
              content_datetime: datetime | None = None,
              probabilities: npt.NDArray[np.floating] | None = None,
              voxel_counts: Mapping[int, int] | None = None,
              ) -> hd.seg.Segmentation | None:
    """A SEG of ``labels`` (shape (slices, rows, columns) on the source grid): binary, or
    fractional (PS3.3 C.8.20.2.3, probability) when ``probabilities`` is given, shape
    (label values 1..N, slices, rows, columns), values in [0, 1].

    ``source`` matches ``labels``' slice axis (or give ``sop_instance_uids`` to order it).
    Returns None when no labelled voxel is present. ``content_datetime`` (default: now)
    should be the job's time so that a rewrite gives the same object. ``voxel_counts``:
    see :func:`present_specs`.
    """
    datasets = order_source(source, labels, sop_instance_uids)
    specs, voxels = present_specs(labels, label_specs, voxel_counts)
    for name, text in (("model", model), ("version", version),
                       ("weights_sha256", weights_sha256), ("manufacturer", manufacturer),
                       ("series_description", series_description)):
        check_text(name, text)
    present = [s for s in specs if voxels[int(s.value)] > 0]
    if not present:
        log.info("job %s: empty prediction, no SEG written", job_key)
        return None
    uids = ResultUids.for_job(job_key, model, version)
    pixel_array: npt.NDArray[Any]
    if probabilities is not None:
        if probabilities.shape[1:] != labels.shape:
            raise ResultError(f"job {job_key}: probabilities shape {probabilities.shape} does "
                              f"not match labels {labels.shape}")
        # labels' slice order is the volume's: aligned. Cast into one float32 array and
        # clip there: clipping float16 and stacking copies cost seconds at 300 x 512^2
        pixel_array = np.empty((*labels.shape, len(present)), dtype=np.float32)
        for i, spec in enumerate(present):
            pixel_array[..., i] = probabilities[int(spec.value) - 1]
        np.clip(pixel_array, 0.0, 1.0, out=pixel_array)
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        pixel_array = segment_map(labels, [int(spec.value) for spec in present])
        seg_type = hd.seg.SegmentationTypeValues.BINARY
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model, version=version, family=codes.cid7162.ArtificialIntelligence,
        source=manufacturer, parameters={"weights_sha256": weights_sha256})
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=check_text("LabelSpec.name", spec.name),
            segmented_property_category=coded(spec.category, f"label {spec.value} category"),
            segmented_property_type=coded(spec.type, f"label {spec.value} type"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=tracking_uid(job_key, model, version, int(spec.value)),
            tracking_id=spec.name)
        for number, spec in enumerate(present, start=1)]
    date, time = dicom_datetime(content_datetime)
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets, pixel_array=pixel_array,
            segmentation_type=seg_type,
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            segment_descriptions=descriptions, series_instance_uid=uids.seg_series,
            series_number=series_number, sop_instance_uid=uids.seg_instance,
            instance_number=1, manufacturer=manufacturer, manufacturer_model_name=model,
            software_versions=version, device_serial_number=weights_sha256,
            content_label=_CONTENT_LABEL,
            content_description=f"{model} {version}"[:_MAX_LO],
            omit_empty_frames=True, series_description=series_description,
            content_date=date, content_time=time, series_date=date, series_time=time)
    except (ValueError, TypeError) as exc:  # highdicom names the offending argument
        raise ResultError(f"job {job_key}: cannot build the SEG: {exc}") from exc
    pin_times(seg, date, time)
    organization = derive_uid("dimension-organization", uids.seg_instance)
    for item in [*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence]:
        item.DimensionOrganizationUID = organization  # highdicom picks a random one
    return seg


def segment_numbers(seg: hd.seg.Segmentation | None) -> Mapping[str, int]:
    """{TrackingUID: SegmentNumber} of a SEG written by :func:`build_seg`."""
    if seg is None:
        return {}
    return {str(item.TrackingUID): int(item.SegmentNumber)
            for item in seg.SegmentSequence if "TrackingUID" in item}
