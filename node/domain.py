"""Frozen values the stages hand each other."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class AssociationInfo:
    """Who sent an instance: the peer as the association negotiated it."""

    calling_ae_title: str
    called_ae_title: str
    address: str
    port: int = 0


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes of one instance that intake, assembly and routing need.

    Patient identifiers are carried only to land in the ``studies`` columns; they are
    excluded from ``repr`` so that they never reach an ordinary log line by accident.
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None = None
    instance_number: int | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    frame_of_reference_uid: str | None = None
    images_in_acquisition: int | None = None
    number_of_frames: int | None = None
    image_position: tuple[float, float, float] | None = None
    image_orientation: tuple[float, float, float, float, float, float] | None = None
    accession_number: str | None = field(default=None, repr=False)
    study_date: str | None = field(default=None, repr=False)
    study_description: str | None = None
    patient_id: str | None = field(default=None, repr=False)
    patient_name: str | None = field(default=None, repr=False)
    patient_birth_date: str | None = field(default=None, repr=False)
    patient_sex: str | None = field(default=None, repr=False)


class StoreResultValues(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"        # same SOP Instance UID, same bytes: nothing written
    REPLACED = "replaced"          # same SOP Instance UID, other bytes: newest kept


@dataclass(frozen=True)
class StoreOutcome:
    result: StoreResultValues
    header: InstanceHeader
    path: str
    size: int


class UnitStateValues(enum.Enum):
    RECEIVING = "receiving"
    COMPLETE = "complete"


class CompletionReasonValues(enum.Enum):
    FAST_PATH = "fast_path"        # association released and series provably complete
    QUIET = "quiet"                # nothing new for the quiet period
    DEADLINE = "deadline"          # hard deadline since the first instance


@dataclass(frozen=True)
class CompletedUnit:
    """A series or a study that assembly has declared complete."""

    level: str                     # "series" or "study"
    study_instance_uid: str
    series_instance_uid: str | None
    generation: int
    reason: CompletionReasonValues
    completed_at: datetime
