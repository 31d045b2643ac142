"""Spool retention: old data goes, data a live job needs stays, the index stays true."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node.db import InstanceRow, SeriesRow, StudyRow
from node.intake import utcnow
from node.jobs import JobSpec, JobStateValues
from node.retention import Retention
from node.settings import RetentionSettings
from tests.unit.helpers import Rig, encode, small_series


def _receive(rig: Rig, seed: int, *, age_days: float) -> str:
    """Store a small series, mark it complete and received ``age_days`` ago."""
    series = small_series(4, seed=seed)
    for ds in series.datasets:
        rig.intake.store(encode(ds))
    when = utcnow() - timedelta(days=age_days)
    with Session(rig.engine) as session, session.begin():
        session.execute(update(SeriesRow)
                        .where(SeriesRow.series_instance_uid == series.series_instance_uid)
                        .values(state="complete", last_received_at=when))
    return series.series_instance_uid


def _job(rig: Rig, key: str, series_uid: str, state: JobStateValues, *,
         study_level: bool = False) -> None:
    with Session(rig.engine) as session, session.begin():
        study = session.get(SeriesRow, series_uid)
        assert study is not None
        rig.jobs.add(session, JobSpec(key, "forward", "r", study.study_instance_uid,
                                      None if study_level else series_uid, 1, {}))
    job = next(j for j in rig.jobs.list() if j.key == key)
    if state is not JobStateValues.PENDING:
        rig.jobs.advance(job.id, state)


def _state(rig: Rig) -> tuple[set[str], set[str], set[str]]:
    """Series UIDs in the index, study UIDs in the index, and series folders on disk."""
    with Session(rig.engine) as session:
        series = set(session.scalars(select(SeriesRow.series_instance_uid)))
        studies = set(session.scalars(select(StudyRow.study_instance_uid)))
        paths = list(session.scalars(select(InstanceRow.path)))
    for rel in paths:
        assert (rig.spool.root / rel).is_file(), rel      # every row has its file
    folders = {p.parent.name for p in rig.spool.root.rglob("*.dcm")}
    return series, studies, folders


def test_old_series_go_but_live_jobs_keep_theirs(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    pending = _receive(rig, 1, age_days=40)
    running_study = _receive(rig, 2, age_days=40)      # a study-level job is running
    finished = _receive(rig, 3, age_days=40)           # its job is done: may go
    orphan = _receive(rig, 4, age_days=31)             # no job at all
    young = _receive(rig, 5, age_days=2)
    _job(rig, "p", pending, JobStateValues.PENDING)
    _job(rig, "r", running_study, JobStateValues.RUNNING, study_level=True)
    _job(rig, "d", finished, JobStateValues.DONE)

    report = Retention(rig.engine, rig.spool, RetentionSettings(max_age_days=30),
                       lock=threading.Lock()).run()

    assert (report.series_removed, report.instances_removed, report.kept_for_jobs) == (2, 8, 2)
    assert report.bytes_freed > 0
    series, studies, folders = _state(rig)
    assert series == folders == {pending, running_study, young}
    assert {finished, orphan}.isdisjoint(folders)
    assert len(studies) == 3                           # the emptied studies' rows went too
    assert rig.intake.reconcile() == 0                 # no file left without a row
    empty = [d for d in rig.spool.root.rglob("*")
             if d.is_dir() and d.name != ".tmp" and not any(d.iterdir())]
    assert empty == []                                 # emptied folders removed
    # once the job is done, the next run removes the series; a run twice is harmless
    job = next(j for j in rig.jobs.list() if j.key == "p")
    rig.jobs.advance(job.id, JobStateValues.DONE)
    retention = Retention(rig.engine, rig.spool, RetentionSettings(max_age_days=30),
                          lock=threading.Lock())
    assert retention.run().series_removed == 1
    assert retention.run().series_removed == 0
    assert _state(rig)[0] == {running_study, young}


def test_high_water_mark_removes_oldest_first_down_to_low_water(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    oldest = _receive(rig, 11, age_days=3)
    middle = _receive(rig, 12, age_days=2)
    newest = _receive(rig, 13, age_days=1)
    per_series = sum(p.stat().st_size for p in rig.spool.root.rglob("*.dcm")) // 3

    def usage(_root: Path) -> tuple[int, int]:
        # a volume of 10 series' worth where the spool is everything in use
        used = sum(p.stat().st_size for p in rig.spool.root.rglob("*.dcm"))
        return per_series * 10, used

    settings = RetentionSettings(high_water_percent=25, low_water_percent=15)
    report = Retention(rig.engine, rig.spool, settings, lock=threading.Lock(),
                       usage=usage).run()
    # 30 % used > 25 %: remove the oldest (20 %), still above 15 %: the next (10 %)
    assert report.series_removed == 2
    assert _state(rig)[0] == {newest}
    assert {oldest, middle}.isdisjoint(_state(rig)[2])
    report = Retention(rig.engine, rig.spool, settings, lock=threading.Lock(),
                       usage=usage).run()
    assert report.series_removed == 0                  # 10 % is below the high-water mark
