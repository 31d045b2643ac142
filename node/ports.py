"""Small interfaces that node/ declares and adapters/ implement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from node.settings import DestinationSettings


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
