"""Small in-process fixtures shared by unit tests."""

from __future__ import annotations

import io
import threading
from pathlib import Path

from pydicom import Dataset
from sqlalchemy import Engine

from node import synth
from node.assembly import Assembly
from node.db import make_engine
from node.domain import CompletedUnit
from node.intake import Intake
from node.jobs import JobStore
from node.settings import AssemblySettings, JobSettings
from node.spool import Spool


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def small_series(slices: int = 6, *, seed: int = 0, omit: tuple[int, ...] = (),
                 modality: str = "CT") -> synth.SyntheticSeries:
    spec = synth.SeriesSpec(modality=modality, slices=slices, rows=32, columns=32, seed=seed,
                            omit_instance_numbers=omit)
    return synth.make_study(spec, seed=seed).series[0]


class RecordingPlanner:
    def __init__(self) -> None:
        self.units: list[CompletedUnit] = []

    def plan(self, session: object, unit: CompletedUnit) -> None:
        self.units.append(unit)


class Rig:
    """Spool + index + intake + assembly on a temporary folder."""

    def __init__(self, root: Path, **assembly: float | bool) -> None:
        self.engine: Engine = make_engine(f"sqlite:///{root / 'index.db'}")
        self.spool = Spool(root / "spool", fsync=True)
        self.spool.root.mkdir(parents=True, exist_ok=True)
        self.spool.prepare()
        lock = threading.Lock()
        self.intake = Intake(self.spool, self.engine, lock=lock)
        self.planner = RecordingPlanner()
        self.assembly = Assembly(self.engine, AssemblySettings(**assembly),  # type: ignore[arg-type]
                                 self.planner, lock=lock)
        self.jobs = JobStore(self.engine, JobSettings(retry_base_seconds=1, max_attempts=3))
