"""Spool retention: remove old series, and the oldest ones while the disk is too full.

A series is removed whole (files and index rows; the study row goes with its last
series), oldest first by its last arrival, and only when it is complete and no job that
is still live (pending, running, encoded, delivering) needs it; a study-level job
protects every series of its study. Rows are deleted first, files after: a crash in
between leaves files without rows, which start-up reconciliation indexes again (nothing
is lost, and the next run removes them). Safe to run twice.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, delete, func, or_, select
from sqlalchemy.orm import Session

from node.db import InstanceRow, JobRow, SeriesRow, StudyRow, begin_write
from node.domain import UnitStateValues
from node.intake import utcnow
from node.jobs import CLAIMABLE, IN_FLIGHT
from node.settings import RetentionSettings
from node.spool import Spool

log = logging.getLogger(__name__)

LIVE = (*CLAIMABLE, *IN_FLIGHT)
DiskUsage = Callable[[Path], tuple[int, int]]      # (total bytes, used bytes)


def disk_usage(path: Path) -> tuple[int, int]:
    usage = shutil.disk_usage(path)
    return usage.total, usage.used


@dataclass(frozen=True)
class RetentionReport:
    series_removed: int = 0
    instances_removed: int = 0
    bytes_freed: int = 0
    kept_for_jobs: int = 0          # series old enough to go, kept because a job needs them


class Retention:
    def __init__(self, engine: Engine, spool: Spool, settings: RetentionSettings, *,
                 lock: threading.Lock, usage: DiskUsage = disk_usage) -> None:
        self.engine = engine
        self.spool = spool
        self.settings = settings
        self._lock = lock
        self._usage = usage

    @property
    def enabled(self) -> bool:
        return bool(self.settings.max_age_days or self.settings.high_water_percent)

    def run(self, now: datetime | None = None) -> RetentionReport:
        now = now or utcnow()
        s = self.settings
        removed = instances = freed = kept = 0
        cutoff = now - timedelta(days=s.max_age_days) if s.max_age_days else None
        draining = False                    # over the high-water mark: down to the low one
        for uid, last in self._candidates():
            if cutoff is None or last > cutoff:
                draining = self._too_full(draining)
                if not draining:
                    break                   # oldest first: nothing younger is too old either
            outcome = self._remove_series(uid)
            if outcome is None:
                kept += 1
                continue
            removed += 1
            instances += outcome[0]
            freed += outcome[1]
        report = RetentionReport(removed, instances, freed, kept)
        if removed or kept:
            log.info("retention: removed %d series (%d instances, %d MiB); kept %d needed by "
                     "live jobs", removed, instances, freed // (1024 * 1024), kept)
        return report

    def _too_full(self, draining: bool) -> bool:
        s = self.settings
        if not s.high_water_percent:
            return False
        total, used = self._usage(self.spool.root)
        percent = 100.0 * used / total if total else 0.0
        low = s.low_water_percent or max(0.0, s.high_water_percent - 5)
        return percent > (low if draining else s.high_water_percent)

    def _candidates(self) -> list[tuple[str, datetime]]:
        with Session(self.engine) as session:
            rows = session.execute(
                select(SeriesRow.series_instance_uid, SeriesRow.last_received_at)
                .where(SeriesRow.state == UnitStateValues.COMPLETE.value)
                .order_by(SeriesRow.last_received_at, SeriesRow.series_instance_uid)
            ).all()
        return [(str(r[0]), r[1]) for r in rows]

    @staticmethod
    def _needed(session: Session, series: SeriesRow) -> bool:
        live = session.scalar(
            select(func.count()).select_from(JobRow).where(
                JobRow.state.in_(LIVE),
                JobRow.study_instance_uid == series.study_instance_uid,
                or_(JobRow.series_instance_uid.is_(None),
                    JobRow.series_instance_uid == series.series_instance_uid)))
        return bool(live)

    def _remove_series(self, uid: str) -> tuple[int, int] | None:
        """Delete one series' rows, then its files; None when a live job needs it."""
        with self._lock, Session(self.engine) as session, session.begin():
            begin_write(session.connection())   # listener processes write beside us
            series = session.get(SeriesRow, uid)
            if series is None or series.state != UnitStateValues.COMPLETE.value:
                return 0, 0
            if self._needed(session, series):
                return None
            study_uid = series.study_instance_uid
            rows = session.execute(select(InstanceRow.path, InstanceRow.size)
                                   .where(InstanceRow.series_instance_uid == uid)).all()
            session.execute(delete(InstanceRow).where(InstanceRow.series_instance_uid == uid))
            session.delete(series)
            session.flush()
            others = session.scalar(select(func.count()).select_from(SeriesRow)
                                    .where(SeriesRow.study_instance_uid == study_uid))
            if not others:
                session.execute(delete(StudyRow)
                                .where(StudyRow.study_instance_uid == study_uid))
        for rel, _size in rows:
            self.spool.remove(rel)
        self._prune_dirs({str(Path(rel).parent) for rel, _ in rows})
        return len(rows), sum(int(size) for _, size in rows)

    def _prune_dirs(self, rels: set[str]) -> None:
        for rel in rels:
            folder = self.spool.root / rel
            for path in (folder, folder.parent):
                try:
                    if path != self.spool.root:
                        os.rmdir(path)
                except OSError:
                    break                   # not empty, or already gone
