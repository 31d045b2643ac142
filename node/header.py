"""Read the attributes intake needs from an encoded instance, without its pixels.

Two readers give the same :class:`InstanceHeader`. The fast one walks the encoded bytes of
a little-endian Part 10 instance (the common case on the C-STORE path) and decodes only
the two dozen attributes intake needs; it gives up (returns ``None``) on anything it does
not handle exactly as pydicom would: another transfer syntax, a character set other than
ASCII, Latin-1 or UTF-8, a multi-valued or malformed value, a length that runs past the
end, tags out of order. pydicom then reads the instance as before, and its errors name
what is wrong. ``tests/unit/test_header.py`` checks both agree on pydicom's test files.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.datadict import tag_for_keyword
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
    fast = read_header_fast(data, transfer_syntax_uid=transfer_syntax_uid)
    return fast if fast is not None else read_header_pydicom(
        data, transfer_syntax_uid=transfer_syntax_uid)


def read_header_file(path: Path) -> InstanceHeader:
    """:func:`read_header` of a Part 10 file, reading only as far as the pixel data."""
    try:
        with path.open("rb") as file:
            return read_header_pydicom(file)
    except OSError as exc:
        raise InvalidInstanceError(f"cannot read the data set: {exc}") from exc


def read_header_pydicom(data: bytes | BinaryIO, *,
                        transfer_syntax_uid: str | None = None) -> InstanceHeader:
    """:func:`read_header` through pydicom: any transfer syntax, every error explained.
    ``data``: the bytes, or a binary file positioned at their start."""
    try:
        source = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
        ds = pydicom.dcmread(source, stop_before_pixels=True, force=True)
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


# -- the fast reader ------------------------------------------------------------------------

_EXPLICIT_LE, _IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR",
                       b"UT", b"SV", b"UV"})
# every other two upper-case letters: what _element takes for a VR with a 16-bit length
_SHORT_VRS = frozenset(bytes((a, b)) for a in range(65, 91) for b in range(65, 91)) - _LONG_VRS
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_HEADER = struct.Struct("<HHI")      # group, element, 32-bit length (implicit VR, items)
_EXPLICIT = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_U32 = struct.Struct("<I")
_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
         "FrameOfReferenceUID")
_TEXTS = ("Modality", "SeriesDescription", "BodyPartExamined", "AccessionNumber",
          "StudyDate", "StudyDescription", "PatientID", "PatientName", "PatientBirthDate",
          "PatientSex")
_INTS = ("InstanceNumber", "SeriesNumber", "ImagesInAcquisition", "NumberOfFrames")
_DECIMALS = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6}
_WANTED = {tag_for_keyword(k): k for k in (*_UIDS, *_TEXTS, *_INTS, *_DECIMALS,
                                           "SpecificCharacterSet")}
_LAST_WANTED = max(t for t in _WANTED if t is not None)
_ENCODINGS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1",
              "ISO_IR 192": "utf-8"}


class _GiveUp(Exception):
    """The fast reader cannot be sure to read this instance as pydicom would."""


def _element(buf: bytes, pos: int, explicit: bool) -> tuple[int, bytes, int, int]:
    """(tag, VR or b"", value length, value offset) of the element at ``pos``; items and
    delimiters (group FFFE) have no VR in either encoding."""
    if explicit and buf[pos:pos + 2] != b"\xfe\xff":
        group, elem, vr, length = _EXPLICIT.unpack_from(buf, pos)
        if vr in _LONG_VRS:
            return (group << 16) | elem, vr, _U32.unpack_from(buf, pos + 8)[0], pos + 12
        if not vr.isalpha() or not vr.isupper():
            raise _GiveUp
        return (group << 16) | elem, vr, length, pos + 8
    group, elem, length = _HEADER.unpack_from(buf, pos)
    return (group << 16) | elem, b"", length, pos + 8


def _skip_sequence(buf: bytes, pos: int, explicit: bool, depth: int = 0) -> int:
    """Offset after an undefined-length sequence whose first item starts at ``pos``."""
    if depth > 16:
        raise _GiveUp
    while True:
        group, elem, length = _HEADER.unpack_from(buf, pos)
        tag, pos = (group << 16) | elem, pos + 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _GiveUp
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: its elements up to the item delimiter
            tag, vr, length, value = _element(buf, pos, explicit)
            if tag == _ITEM_END:
                pos = value
                break
            pos = value + length if length != _UNDEFINED else _skip_sequence(
                buf, value, explicit and vr != b"UN", depth + 1)
        if pos > len(buf):
            raise _GiveUp


def _walk(buf: bytes, pos: int, explicit: bool, *, to_pixels: bool = False) -> dict[str, bytes]:
    """Raw values of the wanted top-level elements; checks every length up to the pixels.
    ``to_pixels``: ``buf`` may be the start of an instance only; give up unless the Pixel
    Data element starts in it (so that every element before it was seen and checked)."""
    found: dict[str, bytes] = {}
    end, previous = len(buf), -1
    unpack = _EXPLICIT.unpack_from
    while pos < end:
        if explicit:    # _element's explicit case, inlined: this loop runs per element
            group, elem, vr, length = unpack(buf, pos)
            tag = (group << 16) | elem
            if group == 0xFFFE:
                tag, vr, length, value = _element(buf, pos, explicit)
            elif vr in _SHORT_VRS:
                value = pos + 8
            elif vr in _LONG_VRS:
                length, value = _U32.unpack_from(buf, pos + 8)[0], pos + 12
            else:
                raise _GiveUp
        else:
            tag, vr, length, value = _element(buf, pos, explicit)
        if tag <= previous:
            raise _GiveUp
        previous = tag
        if tag == _PIXEL_DATA:
            return found
        if length == _UNDEFINED:
            if explicit and vr not in (b"SQ", b"UN"):
                raise _GiveUp
            pos = _skip_sequence(buf, value, explicit and vr != b"UN")
            continue
        pos = value + length
        if pos > end:
            raise _GiveUp
        if tag <= _LAST_WANTED and tag in _WANTED:
            found[_WANTED[tag]] = buf[value:pos]
    if to_pixels:
        raise _GiveUp
    return found


def _single(raw: bytes | None, encoding: str, *, strip_nulls: bool = False) -> str | None:
    if raw is None:
        return None
    text = raw.decode(encoding)
    if strip_nulls:
        text = text.rstrip("\0")
    if "\\" in text or (not strip_nulls and "\0" in text):
        raise _GiveUp            # multi-valued or odd: pydicom's reading differs
    return text.strip() or None


def read_header_fast(data: bytes, *, transfer_syntax_uid: str | None = None,
                     start_only: bool = False) -> InstanceHeader | None:
    """:func:`read_header` for Explicit/Implicit VR Little Endian Part 10 bytes, or None.

    ``start_only``: ``data`` is the beginning of an instance still arriving; the answer
    is the one the whole instance would give, or None when it cannot be sure of that (the
    pixel data does not start within ``data``, or the instance has none).
    """
    try:
        if data[128:132] != b"DICM":
            return None
        meta = _walk_meta(data)
        ts = transfer_syntax_uid or meta[1]
        if ts not in (_EXPLICIT_LE, _IMPLICIT_LE):
            return None
        raw = _walk(data, meta[0], ts == _EXPLICIT_LE, to_pixels=start_only)
        charset = _single(raw.get("SpecificCharacterSet"), "ascii") or ""
        encoding = _ENCODINGS.get(charset)
        if encoding is None:
            return None
        uids = {k: _single(raw.get(k), "ascii", strip_nulls=True) for k in _UIDS}
        texts = {k: _single(raw.get(k), encoding) for k in _TEXTS}
        if any(uids[k] is None for k in _REQUIRED) or "=" in (texts["PatientName"] or ""):
            return None
        ints = {k: _single(raw.get(k), "ascii") for k in _INTS}
        decimals = {}
        for keyword, count in _DECIMALS.items():
            value = raw.get(keyword)
            parts = value.decode("ascii").split("\\") if value else []
            decimals[keyword] = tuple(float(v) for v in parts) if len(parts) == count else None
            if value and decimals[keyword] is None:
                return None
        return InstanceHeader(
            sop_class_uid=uids["SOPClassUID"] or "",
            sop_instance_uid=uids["SOPInstanceUID"] or "",
            study_instance_uid=uids["StudyInstanceUID"] or "",
            series_instance_uid=uids["SeriesInstanceUID"] or "",
            transfer_syntax_uid=ts,
            modality=texts["Modality"],
            instance_number=_to_int(ints["InstanceNumber"]),
            series_number=_to_int(ints["SeriesNumber"]),
            series_description=texts["SeriesDescription"],
            body_part_examined=texts["BodyPartExamined"],
            frame_of_reference_uid=uids["FrameOfReferenceUID"],
            images_in_acquisition=_to_int(ints["ImagesInAcquisition"]),
            number_of_frames=_to_int(ints["NumberOfFrames"]),
            image_position=decimals["ImagePositionPatient"],  # type: ignore[arg-type]
            image_orientation=decimals["ImageOrientationPatient"],  # type: ignore[arg-type]
            accession_number=texts["AccessionNumber"],
            study_date=texts["StudyDate"],
            study_description=texts["StudyDescription"],
            patient_id=texts["PatientID"],
            patient_name=texts["PatientName"],
            patient_birth_date=texts["PatientBirthDate"],
            patient_sex=texts["PatientSex"],
        )
    except (_GiveUp, struct.error, UnicodeDecodeError, ValueError):
        return None


def _to_int(text: str | None) -> int | None:
    return None if text is None else int(text)  # ValueError: pydicom decides


def _walk_meta(data: bytes) -> tuple[int, str]:
    """(offset of the data set, TransferSyntaxUID) from the File Meta group."""
    tag, vr, length, value = _element(data, 132, True)
    if tag != 0x00020000 or vr != b"UL" or length != 4:
        raise _GiveUp
    end = value + 4 + _U32.unpack_from(data, value)[0]
    pos, ts = value + 4, None
    while pos < end:
        tag, vr, length, value = _element(data, pos, True)
        if tag >> 16 != 0x0002 or length == _UNDEFINED:
            raise _GiveUp
        pos = value + length
        if tag == 0x00020010:
            ts = data[value:pos].decode("ascii").rstrip("\0 ")
    if pos != end or not ts:
        raise _GiveUp
    return end, ts
