"""Read the attributes intake needs from an encoded instance, without its pixels."""

from __future__ import annotations

import io
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.domain import InstanceHeader
from node.errors import InvalidInstanceError

_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    try:
        numbers = tuple(float(v) for v in value) if value is not None else ()
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def read_header(data: bytes, *, transfer_syntax_uid: str | None = None) -> InstanceHeader:
    """Parse a Part 10 byte string. Raises InvalidInstanceError naming what is wrong."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        # Touch every element we use now, so lazy parsing errors surface here.
        values: dict[str, Any] = {k: ds.get(k) for k in _REQUIRED}
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError, TypeError,
            AttributeError, NotImplementedError) as exc:
        raise InvalidInstanceError(f"cannot parse the data set: {exc}") from exc
    missing = [k for k, v in values.items() if not v]
    if missing:
        raise InvalidInstanceError(f"required attribute(s) missing or empty: {', '.join(missing)}")
    ts = transfer_syntax_uid
    if ts is None:
        meta = getattr(ds, "file_meta", None)
        ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    try:
        return _header_from(ds, ts or "1.2.840.10008.1.2")
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise InvalidInstanceError(f"cannot read the data set's attributes: {exc}") from exc


def _header_from(ds: Dataset, ts: str) -> InstanceHeader:
    position = _floats(ds, "ImagePositionPatient", 3)
    orientation = _floats(ds, "ImageOrientationPatient", 6)
    return InstanceHeader(
        sop_class_uid=str(ds.SOPClassUID).strip(),
        sop_instance_uid=str(ds.SOPInstanceUID).strip(),
        study_instance_uid=str(ds.StudyInstanceUID).strip(),
        series_instance_uid=str(ds.SeriesInstanceUID).strip(),
        transfer_syntax_uid=ts,
        modality=_text(ds, "Modality"),
        instance_number=_int(ds, "InstanceNumber"),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        images_in_acquisition=_int(ds, "ImagesInAcquisition"),
        number_of_frames=_int(ds, "NumberOfFrames"),
        image_position=position,  # type: ignore[arg-type]  # length checked by _floats
        image_orientation=orientation,  # type: ignore[arg-type]  # length checked by _floats
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate"),
        study_description=_text(ds, "StudyDescription"),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
    )
