"""Harvest labelled pairs from the node's store: (source series, reference SEG).

A reference is a Segmentation whose segments a person made (SegmentAlgorithmType MANUAL
or SEMIAUTOMATIC, PS3.3 C.8.20.2): AUTOMATIC segments, the node's own output included, are
never ground truth. The SEG is matched to its source series through the Referenced Series
Sequence (PS3.3 C.8.20.1 / C.7.6.16.2.6 Derivation Image); the series must be in the store,
every SEG frame must name one of its slices and lie on that slice's plane. Segments map to
the model's labels by SegmentedPropertyType code (value and scheme), never by name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.uid import SegmentationStorage
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from node.db import InstanceRow, SeriesRow, StudyRow
from node.errors import PacsnodeError, VolumeError
from node.inference.volume import Volume, load_volume

log = logging.getLogger(__name__)

_HUMAN = ("MANUAL", "SEMIAUTOMATIC")
_SAME_PLANE_MM = 0.05


class HarvestError(PacsnodeError):
    """A SEG cannot be paired with its source series (the message says why)."""


@dataclass(frozen=True)
class SegCandidate:
    """A SEG in the store with at least one segment made by a person."""

    sop_instance_uid: str
    path: Path
    study_instance_uid: str
    source_series_uid: str
    patient_id: str


@dataclass(frozen=True, eq=False)
class LabelledPair:
    """A source volume and its reference label map on the same grid (slice, row, column)."""

    seg: SegCandidate
    volume: Volume
    labels: npt.NDArray[np.uint8]
    source_files: tuple[Path, ...]
    label_voxels: dict[int, int]


@dataclass(frozen=True)
class Survey:
    """What the store holds: usable candidates, SEGs ignored as AI-made, and refusals."""

    candidates: tuple[SegCandidate, ...]
    automatic: tuple[str, ...]               # SOP Instance UIDs of AI-only SEGs
    refused: tuple[tuple[str, str], ...]     # (SOP Instance UID, reason)


def survey(engine: Engine, spool: Path) -> Survey:
    """Read the headers of every SEG in the index (no pixels)."""
    with Session(engine) as session:
        rows = session.execute(
            select(InstanceRow.sop_instance_uid, InstanceRow.path,
                   SeriesRow.study_instance_uid, StudyRow.patient_id)
            .join(SeriesRow, InstanceRow.series_instance_uid == SeriesRow.series_instance_uid)
            .join(StudyRow, SeriesRow.study_instance_uid == StudyRow.study_instance_uid)
            .where(InstanceRow.sop_class_uid == str(SegmentationStorage))
            .order_by(InstanceRow.received_at)).all()
    candidates, automatic, refused = [], [], []
    for uid, rel, study_uid, patient_id in rows:
        path = spool / rel
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, ValueError) as exc:
            refused.append((uid, f"cannot read {path}: {exc}"))
            continue
        kinds = {str(s.get("SegmentAlgorithmType", "")) for s in ds.get("SegmentSequence", [])}
        if not kinds & set(_HUMAN):
            automatic.append(uid)
            continue
        refs = ds.get("ReferencedSeriesSequence") or []
        if len(refs) != 1:
            refused.append((uid, f"SEG {uid}: expected one item in ReferencedSeriesSequence, "
                                 f"found {len(refs)}"))
            continue
        candidates.append(SegCandidate(uid, path, study_uid, str(refs[0].SeriesInstanceUID),
                                       str(patient_id or "")))
    return Survey(tuple(candidates), tuple(automatic), tuple(refused))


def load_pair(engine: Engine, spool: Path, candidate: SegCandidate,
              label_codes: Mapping[tuple[str, str], int]) -> LabelledPair:
    """The source volume and the label map of ``candidate``; HarvestError says why not."""
    uid, series_uid = candidate.sop_instance_uid, candidate.source_series_uid
    with Session(engine) as session:
        rels = session.scalars(select(InstanceRow.path).where(
            InstanceRow.series_instance_uid == series_uid)).all()
    if not rels:
        raise HarvestError(f"SEG {uid}: its source series {series_uid} is not in the store")
    files = tuple(spool / r for r in rels)
    try:
        volume = load_volume(files, series_instance_uid=series_uid)
    except VolumeError as exc:
        raise HarvestError(f"SEG {uid}: source series is not one volume: {exc}") from exc
    seg = hd.seg.segread(candidate.path)
    numbers = _segment_labels(seg, uid, label_codes)
    _check_geometry(seg, uid, volume)
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(volume.sop_instance_uids),
            segment_numbers=sorted(numbers), combine_segments=False,
            assert_missing_frames_are_empty=True)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise HarvestError(f"SEG {uid}: frames do not map onto series {series_uid}: {exc}") \
            from exc
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    for i, number in enumerate(sorted(numbers)):
        labels[np.asarray(pixels[..., i]) > 0] = numbers[number]
    values, counts = np.unique(labels, return_counts=True)
    voxels = {int(v): int(c) for v, c in zip(values, counts, strict=True) if v}
    return LabelledPair(candidate, volume, labels, files, voxels)


def _segment_labels(seg: hd.seg.Segmentation, uid: str,
                    label_codes: Mapping[tuple[str, str], int]) -> dict[int, int]:
    """{segment number: model label} for the segments made by a person."""
    numbers: dict[int, int] = {}
    unknown = []
    for item in seg.SegmentSequence:
        if str(item.SegmentAlgorithmType) not in _HUMAN:
            continue
        code = item.SegmentedPropertyTypeCodeSequence[0]
        key = (str(code.CodeValue), str(code.CodingSchemeDesignator))
        if key in label_codes:
            numbers[int(item.SegmentNumber)] = label_codes[key]
        else:
            unknown.append(f"{key[1]} {key[0]} ({code.get('CodeMeaning', '')})")
    if not numbers:
        known = ", ".join(f"{s} {v}" for v, s in label_codes)
        raise HarvestError(f"SEG {uid}: no segment made by a person has a property type the "
                           f"model knows (found {', '.join(unknown) or 'none'}; model labels: "
                           f"{known})")
    return numbers


def _check_geometry(seg: hd.seg.Segmentation, uid: str, volume: Volume) -> None:
    """Every frame references a slice of the volume and lies on that slice's plane."""
    rows, columns = volume.array.shape[1:]
    if (int(seg.Rows), int(seg.Columns)) != (rows, columns):
        raise HarvestError(f"SEG {uid}: frames are {seg.Rows}x{seg.Columns} but the source "
                           f"slices are {rows}x{columns} (Rows x Columns)")
    index = {u: k for k, u in enumerate(volume.sop_instance_uids)}
    normal = np.cross(volume.orientation[:3], volume.orientation[3:])
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        refs = _frame_sources(frame)
        if len(refs) != 1 or refs[0] not in index:
            raise HarvestError(f"SEG {uid}: frame {i} references {refs or 'no source image'}, "
                               f"expected one slice of series {volume.series_instance_uid}")
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        k = index[refs[0]]
        expected = volume.affine[:3, 3] + k * volume.affine[:3, 2]
        off = float(abs((np.array(position, dtype=float) - expected) @ normal))
        if off > _SAME_PLANE_MM:
            raise HarvestError(f"SEG {uid}: frame {i} lies {off:.2f} mm off the plane of its "
                               f"source slice {refs[0]}")


def _frame_sources(frame: pydicom.Dataset) -> Sequence[str]:
    out = []
    for derivation in frame.get("DerivationImageSequence") or []:
        for source in derivation.get("SourceImageSequence") or []:
            out.append(str(source.ReferencedSOPInstanceUID))
    return out
