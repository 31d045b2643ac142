"""Small interfaces that node/ declares and adapters/ implement."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Protocol

from node.settings import DestinationSettings, SourceSettings


@dataclass(frozen=True)
class SendReport:
    destination: str
    sent: int
    failed: tuple[tuple[str, str], ...] = ()   # (file name, reason)


class Sender(Protocol):
    """Delivers Part 10 files to a destination; raises DeliveryError."""

    def send(self, destination: DestinationSettings, paths: Sequence[Path]) -> SendReport: ...

    def echo(self, destination: DestinationSettings) -> float:
        """Verify the destination answers; return the round trip in seconds."""
        ...


@dataclass(frozen=True)
class RemoteSeries:
    """One series a source offers (a QIDO-RS or C-FIND answer)."""

    study_instance_uid: str
    series_instance_uid: str
    instances: int | None           # NumberOfSeriesRelatedInstances, when the source says
    study_date: str | None = None   # YYYYMMDD


@dataclass(frozen=True)
class MovedInstances:
    """Instances a source sent to the node's own Storage SCP (C-MOVE, PS3.4 C.4.2) instead
    of returning them: they were stored through the receiver before this is yielded."""

    count: int


class StudySource(Protocol):
    """An archive to pull from (QIDO-RS + WADO-RS, or C-FIND + C-GET/C-MOVE); raises
    SourceError."""

    def find_series(self, source: SourceSettings, *, since: date | None,
                    extra: Mapping[str, str] | None = None) -> list[RemoteSeries]:
        """Series matching the source's filters (and ``extra`` query keys), of studies
        dated ``since`` or later."""
        ...

    def fetch_series(self, source: SourceSettings, study_instance_uid: str,
                     series_instance_uid: str) -> Iterator[bytes | MovedInstances]:
        """The series' instances, each as a Part 10 byte string (or, after a C-MOVE, how
        many the node's receiver got)."""
        ...
