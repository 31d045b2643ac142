"""STOW-RS receive (PS3.18 §10.5): store the instances of one request, answer per instance.

Every part goes through :meth:`node.intake.Intake.receive` while it arrives, as a
C-STORE's data set does, so the C-STORE durability rule holds: an instance is listed in
ReferencedSOPSequence only once it is fsync'd and indexed. The end of a request plays
the part of an association release: the series it carried are handed to assembly's fast
path.

Response status (PS3.18 Table 10.5.3-1): 200 when every instance was stored, 202 when
some failed, 409 when none was stored; the body lists the failures with a FailureReason
(PS3.4 Table B.2-1 codes, as C-STORE would answer).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from node.domain import AssociationInfo, InstanceHeader
from node.header import read_header
from node.errors import (
    DatasetMismatchError,
    IntakeError,
    InvalidInstanceError,
    PacsnodeError,
    StorageFullError,
)
from node.intake import Intake
from node.metrics import Metrics
from node.multipart import MultipartError, Read, StreamPart, iter_parts, parse_media_type

log = logging.getLogger(__name__)

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
_PREAMBLE = b"\x00" * 128 + b"DICM"


class FailureReasonValues:
    """FailureReason (0008,1197) values used in STOW-RS responses (PS3.4 Table B.2-1)."""

    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000


class StowRequestError(PacsnodeError):
    """The request as a whole cannot be read: ``status`` 400 (malformed) or 415 (media type)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Failure:
    number: int                    # the part's position in the body, from 1
    sop_class_uid: str | None
    sop_instance_uid: str | None
    reason: int
    detail: str


@dataclass(frozen=True)
class StowResult:
    status: int
    body: dict[str, Any]           # DICOM JSON (PS3.18 Annex F)
    stored: int
    failures: tuple[Failure, ...]


class StowReceiver:
    """Turns one STOW-RS request into intake calls and a response."""

    def __init__(self, intake: Intake, *, ae_title: str,
                 on_released: Callable[[dict[str, int]], None] = lambda _: None,
                 metrics: Metrics | None = None) -> None:
        self.intake = intake
        self.ae_title = ae_title
        self.on_released = on_released
        self.metrics = metrics or Metrics()

    def receive(self, content_type: str, body: bytes | Read, *,
                study_instance_uid: str | None = None, address: str = "",
                port: int = 0) -> StowResult:
        """Store every part; raises StowRequestError when the body cannot be read at all.

        ``body``: the whole body, or a ``read(n)`` function to read it with as it
        arrives. Each part is stored while it arrives (as a C-STORE's data set is), so an
        upload of any size needs about a megabyte of buffer, plus a part's first bytes
        until its header is read (node/intake.py HEADER_WINDOW). A body that
        breaks off or goes wrong after some parts were stored is answered 202: those
        parts, and the one where reading stopped as failed; before any was, 400.
        """
        boundary = _boundary(content_type)
        read = io.BytesIO(body).read if isinstance(body, bytes | bytearray) else body
        peer = AssociationInfo(calling_ae_title="", called_ae_title=self.ae_title,
                               address=address, port=port)
        referenced: list[tuple[str, str]] = []
        failures: list[Failure] = []
        carried: dict[str, set[str]] = {}     # series UID -> its instances stored
        parts = iter_parts(read, boundary)
        number = 0                            # the part being read (parts count from 1)
        try:
            while True:
                number += 1
                try:
                    part = next(parts, None)
                    if part is None:
                        break
                    stored = self._store_part(part, study_instance_uid, peer, failures)
                except (MultipartError, OSError) as exc:
                    if not referenced and not failures:
                        what = "malformed multipart body" if isinstance(exc, MultipartError) \
                            else "the body could not be read"
                        raise StowRequestError(400, f"{what}: {exc}") from exc
                    failures.append(Failure(number, None, None,
                                            FailureReasonValues.CANNOT_UNDERSTAND,
                                            f"reading the body stopped at part {number}: "
                                            f"{exc}"))
                    break
                if stored is not None:
                    header, size = stored
                    referenced.append((header.sop_class_uid, header.sop_instance_uid))
                    carried.setdefault(header.series_instance_uid, set()).add(
                        header.sop_instance_uid)
                    self.metrics.inc("pacsnode_instances_received_total")
                    self.metrics.inc("pacsnode_bytes_received_total", float(size))
        finally:
            if carried:
                self.on_released({uid: len(sops) for uid, sops in carried.items()})
        if not referenced and not failures:
            raise StowRequestError(400, "the multipart body holds no parts")
        for f in failures:
            self.metrics.inc("pacsnode_instances_refused_total", status=f"{f.reason:04X}")
            log.warning("STOW-RS from %s: %s refused (%04X): %s", address,
                        f.sop_instance_uid or f"part {f.number}", f.reason, f.detail)
        status = 200 if not failures else 202 if referenced else 409
        return StowResult(status, _response(referenced, failures), len(referenced),
                          tuple(failures))

    def _store_part(self, part: StreamPart, study_instance_uid: str | None,
                    peer: AssociationInfo, failures: list[Failure],
                    ) -> tuple[InstanceHeader, int] | None:
        """Store one part while it arrives: its header and size, or None with a failure
        added. MultipartError/OSError (the body itself) pass through, nothing kept."""
        number = part.number
        kind = part.content_type or DICOM
        if kind != DICOM:
            for _ in part.pieces():
                pass
            failures.append(Failure(number, None, None, FailureReasonValues.CANNOT_UNDERSTAND,
                                    f"part {number}: Content-Type {kind!r}, expected {DICOM}"))
            return None
        pieces = part.pieces()
        first = _with_preamble(_head(pieces))     # (also where a refusal's UIDs are read)
        incoming = self.intake.receive(first, peer=peer,
                                       expected_study_instance_uid=study_instance_uid)
        try:
            for piece in pieces:
                incoming.add(piece)
        except BaseException:
            incoming.abandon()
            raise
        try:
            outcome = incoming.finish()
        except IntakeError as exc:
            failures.append(_failure(number, first, exc))
            return None
        return outcome.header, outcome.size


def _boundary(content_type: str) -> str:
    """The boundary of a STOW-RS request's Content-Type, or StowRequestError (415)."""
    media = parse_media_type(content_type or "")
    if media.value != "multipart/related":
        raise StowRequestError(415, f"Content-Type {media.value or '(none)'!r} is not "
                                    f'supported; expected multipart/related; type="{DICOM}"')
    kind = media.params.get("type", "").lower()
    if kind != DICOM:
        raise StowRequestError(415, f"multipart/related type {kind or '(none)'!r} is not "
                                    f"supported; only {DICOM!r} (instances as Part 10 files)")
    # (one missing or too long: iter_parts says so, a 400 before any part)
    return media.params.get("boundary", "")


def _head(pieces: Iterator[bytes]) -> bytes:
    """The part's first piece, joined with the next ones while shorter than 132 bytes
    (the preamble and "DICM": enough to tell whether the preamble is missing)."""
    head = b""
    for piece in pieces:
        head += piece
        if len(head) >= 132:
            break
    return head


def _with_preamble(data: bytes) -> bytes:
    """Some clients (pydicom's dcmwrite of a data set read without one) send the file meta
    group but no preamble/"DICM" prefix (PS3.10 §7.1); the spool keeps Part 10 files."""
    if data[128:132] != b"DICM" and data[:2] == b"\x02\x00":
        return _PREAMBLE + data
    return data


def _failure(number: int, data: bytes, exc: IntakeError) -> Failure:
    if isinstance(exc, StorageFullError):
        reason = FailureReasonValues.OUT_OF_RESOURCES
    elif isinstance(exc, DatasetMismatchError):
        reason = FailureReasonValues.DATASET_DOES_NOT_MATCH
    elif isinstance(exc, InvalidInstanceError):
        reason = FailureReasonValues.CANNOT_UNDERSTAND
    else:
        reason = FailureReasonValues.OUT_OF_RESOURCES
    sop_class, sop_instance = _uids(data)
    return Failure(number, sop_class, sop_instance, reason, f"part {number}: {exc}")


def _uids(data: bytes) -> tuple[str | None, str | None]:
    """The SOP Class/Instance UID of a refused part, when its header can still be read
    (from the part's first piece: up to a megabyte)."""
    try:
        header = read_header(data)
    except IntakeError:
        return None, None
    return header.sop_class_uid, header.sop_instance_uid


def _response(referenced: list[tuple[str, str]], failures: list[Failure]) -> dict[str, Any]:
    ds = Dataset()
    if referenced:
        ds.ReferencedSOPSequence = [_item(c, i) for c, i in referenced]
    if failures:
        items = []
        for f in failures:
            item = _item(f.sop_class_uid, f.sop_instance_uid)
            item.FailureReason = f.reason
            items.append(item)
        ds.FailedSOPSequence = items
    return ds.to_json_dict()


def _item(sop_class_uid: str | None, sop_instance_uid: str | None) -> Dataset:
    item = Dataset()
    if sop_class_uid:
        item.ReferencedSOPClassUID = sop_class_uid
    if sop_instance_uid:
        item.ReferencedSOPInstanceUID = sop_instance_uid
    return item
