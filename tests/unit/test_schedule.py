"""The scheduler: persisted jobs are not duplicated by a restart, a missed run within
the grace time runs once (coalesced), tasks are reconciled with the configuration."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import pytest

from node.app import Node
from node.db import make_engine
from node.errors import ConfigError
from node.schedule import TABLE, Scheduler, Task, cron, every
from node.settings import ScheduleSettings, Settings, StorageSettings


def _rows(db: Path) -> list[str]:
    with sqlite3.connect(db) as con:
        return sorted(r[0] for r in con.execute(f"select id from {TABLE}"))


def test_restart_keeps_one_job_per_task_and_its_next_run(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    engine = make_engine(f"sqlite:///{db}")
    tasks = [Task("sweep", lambda: None, every(3600)), Task("retention", lambda: None,
                                                           every(7200))]
    first = Scheduler(engine, ScheduleSettings())
    first.start(tasks)
    nxt = {j.id: j.next_run_time for j in first._scheduler.get_jobs()}
    first.stop()
    second = Scheduler(engine, ScheduleSettings())
    second.start(tasks)
    assert second.job_ids() == ["retention", "sweep"]
    assert {j.id: j.next_run_time for j in second._scheduler.get_jobs()} == nxt
    second.stop()
    assert _rows(db) == ["retention", "sweep"]
    # a task dropped from the configuration is removed; a changed trigger replaced
    third = Scheduler(engine, ScheduleSettings())
    third.start([Task("sweep", lambda: None, every(60))])
    assert third.job_ids() == ["sweep"]
    assert str(third._scheduler.get_job("sweep").trigger) == str(every(60))
    third.stop()
    assert _rows(db) == ["sweep"]


def test_runs_missed_during_downtime_are_made_up_once(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    runs: list[float] = []
    tasks = [Task("tick", lambda: runs.append(time.monotonic()), every(2))]
    before = Scheduler(engine, ScheduleSettings(misfire_grace_seconds=60))
    before.start(tasks)
    before.stop()                        # down before the first run at +2 s
    time.sleep(6.5)                      # the runs at +2, +4 and +6 s are missed
    after = Scheduler(engine, ScheduleSettings(misfire_grace_seconds=60))
    started = time.monotonic()
    after.start(tasks)
    try:
        time.sleep(0.9)                  # the next regular run is at +8 s
        assert len(runs) == 1            # coalesced: one run, not three
        assert runs[0] - started < 0.6   # made up at once
    finally:
        after.stop()


def test_node_schedules_housekeeping_and_the_finetune_hook(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = StorageSettings(spool=tmp_path / "spool", database=f"sqlite:///{tmp_path}/i.db",
                              audit_log=tmp_path / "audit.jsonl")
    plain = Node(Settings(storage=storage), spawn_worker=False)
    assert [t.id for t in plain.scheduled_tasks()] == ["retry-sweep", "stale-jobs"]
    settings = Settings(storage=storage, schedule=ScheduleSettings(finetune_cron="0 2 * * *"),
                        retention={"max_age_days": 30})  # type: ignore[arg-type]  # parsed
    node = Node(settings, spawn_worker=False)
    tasks = {t.id: t for t in node.scheduled_tasks()}
    assert sorted(tasks) == ["finetune-nightly", "retention", "retry-sweep", "stale-jobs"]
    with caplog.at_level(logging.INFO, logger="node.app"):
        tasks["finetune-nightly"].func()
    assert "no finetune configured" in caplog.text
    called: list[bool] = []
    node.finetune = lambda: called.append(True)
    tasks["finetune-nightly"].func()
    assert called == [True]
    with pytest.raises(ConfigError, match="schedule.finetune_cron"):
        cron("0 25 * * *")
