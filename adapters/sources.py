"""The StudySource for every configured ``[[sources]]`` kind (node/pull.py's port)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import date

from adapters.dicomweb import DicomwebSource
from adapters.dimse_source import DimseSource
from node.ports import MovedInstances, RemoteSeries, StudySource
from node.settings import SourceSettings


class AnySource:
    def __init__(self, *, ae_title: str) -> None:
        self._by_kind: dict[str, StudySource] = {
            "dicomweb": DicomwebSource(),
            "dimse": DimseSource(ae_title=ae_title),
        }

    def find_series(self, source: SourceSettings, *, since: date | None,
                    extra: Mapping[str, str] | None = None) -> list[RemoteSeries]:
        return self._by_kind[source.kind].find_series(source, since=since, extra=extra)

    def fetch_series(self, source: SourceSettings, study_instance_uid: str,
                     series_instance_uid: str) -> Iterator[bytes | MovedInstances]:
        return self._by_kind[source.kind].fetch_series(source, study_instance_uid,
                                                       series_instance_uid)
