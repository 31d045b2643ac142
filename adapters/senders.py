"""One Sender over every destination kind: DIMSE C-STORE or DICOMweb STOW-RS."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from adapters.dicomweb import DicomwebSender
from adapters.dimse import DimseSender
from node.ports import SendReport, Sender
from node.settings import DestinationSettings


class AnySender:
    def __init__(self, *, ae_title: str) -> None:
        self._by_kind: dict[str, Sender] = {
            "dimse": DimseSender(ae_title=ae_title),
            "dicomweb": DicomwebSender(),
        }

    def send(self, destination: DestinationSettings, paths: Sequence[Path]) -> SendReport:
        return self._by_kind[destination.kind].send(destination, paths)

    def echo(self, destination: DestinationSettings) -> float:
        return self._by_kind[destination.kind].echo(destination)
