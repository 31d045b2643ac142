"""Periodic work on APScheduler 3 (the only module besides the composition root that
imports it).

Jobs live in a persistent SQLAlchemy job store in the node's database (table
``scheduled_jobs``), so their next run times survive a restart: a run missed while the
node was down is made up once at start (``coalesce``) when it is no older than
``schedule.misfire_grace_seconds``, and skipped otherwise. ``max_instances = 1``: a run
never overlaps the previous one of the same task.

A persistent store keeps a textual reference to the function it calls, so the stored
jobs all call :func:`run_task` with the task's id, and the running node registers what
each id does (:class:`Scheduler` does that on :meth:`~Scheduler.start`). Every task is
safe to run twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine

from node.errors import ConfigError
from node.settings import ScheduleSettings

log = logging.getLogger(__name__)

TABLE = "scheduled_jobs"
_TASKS: dict[str, Callable[[], object]] = {}      # task id -> what it does in this process
_TASKS_LOCK = threading.Lock()


def run_task(task_id: str) -> None:
    """What every stored job calls (APScheduler keeps this reference in the database)."""
    with _TASKS_LOCK:
        task = _TASKS.get(task_id)
    if task is None:
        log.warning("scheduled task %s has nothing to run in this process", task_id)
        return
    try:
        task()
    except Exception:
        log.exception("scheduled task %s failed", task_id)


@dataclass(frozen=True)
class Task:
    id: str
    func: Callable[[], object]
    trigger: BaseTrigger


def every(seconds: float) -> IntervalTrigger:
    return IntervalTrigger(seconds=seconds)


def cron(line: str, key: str = "schedule.finetune_cron") -> CronTrigger:
    try:
        return CronTrigger.from_crontab(line)
    except ValueError as exc:
        raise ConfigError(f"{key}: expected a crontab line such as \"0 2 * * *\"; found "
                          f"{line!r} ({exc})") from exc


class Scheduler:
    def __init__(self, engine: Engine, settings: ScheduleSettings, *, threads: int = 4) -> None:
        self.settings = settings
        # one line per run at INFO would flood the log with short polling intervals;
        # failures still reach it (run_task logs them, and so does APScheduler at WARNING)
        logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)
        self._scheduler = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=engine, tablename=TABLE)},
            executors={"default": ThreadPoolExecutor(threads)},
            job_defaults={"coalesce": True, "max_instances": 1,
                          "misfire_grace_time": int(settings.misfire_grace_seconds)},
        )
        self._ids: set[str] = set()

    def start(self, tasks: Sequence[Task]) -> None:
        """Reconcile ``tasks`` with the stored jobs (see :meth:`update`), then run."""
        self._scheduler.start(paused=True)
        self.update(tasks)
        self._scheduler.resume()

    def update(self, tasks: Sequence[Task]) -> None:
        """Register ``tasks`` and make the stored jobs match them.

        A stored job whose trigger is unchanged keeps its next run time (so a run missed
        during downtime is made up); a changed one is replaced; one no longer configured
        is removed.
        """
        ids = {t.id for t in tasks}
        with _TASKS_LOCK:
            for gone in self._ids - ids:
                _TASKS.pop(gone, None)
            for task in tasks:
                _TASKS[task.id] = task.func
        self._ids = ids
        for job in self._scheduler.get_jobs():
            if job.id not in ids:
                log.info("scheduled task %s is no longer configured; removed", job.id)
                job.remove()
        grace = int(self.settings.misfire_grace_seconds)
        for task in tasks:
            job = self._scheduler.get_job(task.id)
            if job is not None and str(job.trigger) == str(task.trigger) \
                    and job.args == (task.id,):
                if job.misfire_grace_time != grace:
                    job.modify(misfire_grace_time=grace)
                continue
            self._scheduler.add_job(run_task, task.trigger, args=[task.id], id=task.id,
                                    name=task.id, replace_existing=True)
        for job in self._scheduler.get_jobs():
            log.info("scheduled %s: %s, next run %s", job.id, job.trigger,
                     getattr(job, "next_run_time", None))

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def job_ids(self) -> list[str]:
        return sorted(job.id for job in self._scheduler.get_jobs())

    def stop(self) -> None:
        """Stop scheduling; a task that is running is waited for."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        with _TASKS_LOCK:
            for task_id in self._ids:
                _TASKS.pop(task_id, None)
